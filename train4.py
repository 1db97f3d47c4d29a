"""Training: `python train4.py train_base|train_joint <config.yaml> <exper_name> [--eval] [--debug] [--resume | --overwrite]`.

Tasks (one trainer, pipeline/training_run.py; the reference's train_base also called train_joint)
  train_base    MagicPoint on synthetic shapes (configs/magicpoint_shapes_pair.yaml)
  train_joint   SuperPoint, detector and descriptor (configs/superpoint_coco_train_heatmap.yaml)

Outputs go to EXPER_PATH/<exper_name>/ (config.yml, checkpoints/, metrics.jsonl) and tensorboard
events to runs/<task>/<exper_name>_<date>. Several processes: `torchrun --nproc_per_node=N train4.py ...`.
"""
import argparse
import sys

from pipeline import training_run
from utils.cli import EXIT_DIVERGED, exit_on_error, setup_logging
from utils.divergence import TrainingDiverged

TASKS = ("train_base", "train_joint")


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("exper_name", help="experiment name: outputs go to EXPER_PATH/<exper_name>/")
    parser.add_argument("--eval", action="store_true", help="validate every validation_interval iterations")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging")
    training_run.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    try:
        training_run.run(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    main()
