"""Exports: `python export.py <task> <config.yaml> <exper_name> [flags]`.

Tasks
  export_descriptor           HPatches keypoints, descriptors and matches -> EXPER_PATH/<exper>/predictions/<i>.npz
  export_detector_homoAdapt   homography-adaptation labels -> EXPER_PATH/<exper>/predictions/<split>/<image>.npz
  export_features             features of every image of a folder -> EXPER_PATH/<exper>/features.h5 (hloc layout)
  export_onnx                 the network as ONNX (dynamic batch, height, width) -> EXPER_PATH/<exper>/superpoint.onnx
`python export.py <task> --help` lists the flags of a task.
"""
import argparse
import importlib
import sys

from utils import precision
from utils import runs
from utils.backends import BACKEND_NAMES
from utils.cli import exit_on_error, setup_logging
from utils.config import load_yaml

TASKS = {
    "export_descriptor": "pipeline.export_descriptor",
    "export_detector_homoAdapt": "pipeline.homography_adaptation_export",
    "export_features": "pipeline.export_features",
    "export_onnx": "pipeline.export_onnx",
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
    parser.add_argument("--backend", choices=list(BACKEND_NAMES), default=None,
                        help="runtime of the network (overrides model.backend; utils/backends.py)")
    parser.add_argument("--threads", type=threads_arg, default=None,
                        help="CPU threads: N or auto (overrides model.threads; auto leaves the cores other "
                             "processes use free)")
    runs.add_arguments(parser)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.task = task
    setup_logging(args.debug)
    threads = args.threads or (load_yaml(args.config).get("model") or {}).get("threads", "auto")
    precision.set_threads(threads, key="--threads" if args.threads else f"{args.config}: model.threads")
    module.run(args)


def threads_arg(value: str):
    """--threads: a positive integer or 'auto'."""
    if value == "auto":
        return value
    try:
        return precision.check_threads(int(value), "--threads")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a positive integer nor 'auto'") from None


if __name__ == "__main__":
    main()
