"""Exports: `python export.py <task> <config.yaml> <exper_name> [flags]`.

Tasks
  export_descriptor           HPatches keypoints, descriptors and matches -> EXPER_PATH/<exper>/predictions/<i>.npz
  export_detector_homoAdapt   homography-adaptation labels -> EXPER_PATH/<exper>/predictions/<split>/<image>.npz
  export_features             features of every image of a folder -> EXPER_PATH/<exper>/features.h5 (hloc layout)
`python export.py <task> --help` lists the flags of a task.
"""
import argparse
import importlib
import sys

from utils.cli import exit_on_error, setup_logging

TASKS = {
    "export_descriptor": "pipeline.export_descriptor",
    "export_detector_homoAdapt": "pipeline.homography_adaptation_export",
    "export_features": "pipeline.export_features",
}


@exit_on_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    first.add_argument("task", choices=sorted(TASKS))
    task = first.parse_args(argv[:1]).task
    module = importlib.import_module(TASKS[task])  # only the chosen task's imports are paid for

    parser = argparse.ArgumentParser(prog=f"export.py {task}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("exper_name", help="experiment name: outputs go to EXPER_PATH/<exper_name>/")
    parser.add_argument("--eval", action="store_true", help="accepted for compatibility with the reference")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default=None,
                        help="network precision (overrides model.precision)")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.task = task
    setup_logging(args.debug)
    module.run(args)


if __name__ == "__main__":
    main()
