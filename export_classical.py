"""SIFT baseline: `python export_classical.py export_descriptor configs/classical_descriptors.yaml <exper>`.

Writes EXPER_PATH/<exper>/predictions/<i>.npz as the reference: prob/warped_prob (N, 2) [x, y] (no
score column), desc/warped_desc (N, 128), matches (M, 6) [x1, y1, x2, y2, distance, ratio] after
Lowe's ratio test (0.8), matches_all, plus image, warped_image and homography.
"""
import argparse

import settings
from datasets.patches_dataset import PatchesDataset
from models.classical import ratio_test_matches, sift_features
from pipeline.export_descriptor import export_pairs, load_export_config, prepare_output
from utils.cli import exit_on_error, setup_logging
from utils import runs
from utils.config import check_choice


def describe_pair(sample: dict) -> dict:
    p1, d1 = sift_features(sample["image"][0].numpy())
    p2, d2 = sift_features(sample["warped_image"][0].numpy())
    good, every = ratio_test_matches(p1, d1, p2, d2)
    return {"prob": p1, "warped_prob": p2, "desc": d1, "warped_desc": d2, "matches": good, "matches_all": every}


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["export_descriptor"])
    parser.add_argument("config")
    parser.add_argument("exper_name")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="overrides data.preprocessing.resize")
    runs.add_arguments(parser)
    parser.add_argument("--correspondence", action="store_true", help="accepted for compatibility; unused")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    conf = load_export_config(args.config, resize=args.resize)
    check_choice(conf["model"]["method"], ("sift",), "model.method", args.config)
    dataset = PatchesDataset(conf["data"], data_path=settings.DATA_PATH, source=args.config)
    predictions, plan = prepare_output(args.exper_name, conf, "export_classical", args.resume, args.overwrite)
    summary = export_pairs(dataset, describe_pair, predictions, resume=plan.mode == "resume",
                           max_bad_fraction=args.max_bad_fraction)
    plan.update(bad_items={"count": summary["n_failed"], "items": summary["failed"]})
    print(f"exported {summary['n_written']} pairs to {predictions} ({summary['n_failed']} failed)")


if __name__ == "__main__":
    main()
