"""Exports: `python export.py <task> <config.yaml> <exper_name> [flags]`.

Tasks
  export_descriptor           HPatches keypoints, descriptors and matches -> EXPER_PATH/<exper>/predictions/<i>.npz
  export_detector_homoAdapt   homography-adaptation labels -> EXPER_PATH/<exper>/predictions/<split>/<image>.npz
"""
import argparse
import importlib

from utils.cli import exit_on_error, setup_logging

TASKS = {
    "export_descriptor": "pipeline.export_descriptor",
    "export_detector_homoAdapt": "pipeline.homography_adaptation_export",
}


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    for task, module in TASKS.items():
        p = sub.add_parser(task)
        p.add_argument("config", help="YAML config file")
        p.add_argument("exper_name", help="experiment name: outputs go to EXPER_PATH/<exper_name>/")
        p.add_argument("--eval", action="store_true", help="accepted for compatibility with the reference")
        p.add_argument("--debug", action="store_true", help="DEBUG logging")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default=None,
                       help="network precision (overrides model.precision)")
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    main()
