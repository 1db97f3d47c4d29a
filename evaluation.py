"""HPatches evaluation: `python evaluation.py <predictions_dir> [-r] [-homo] [-o] [-plm] [--sift] [--compat]`.

Reads the `<i>.npz` written by `export.py export_descriptor` (or export_classical.py) and writes
result.txt, result.npz and result.json into the same folder (see utils/evaluation.py).
"""
import argparse
import sys

from utils.cli import EXIT_ENVIRONMENT, exit_on_error, setup_logging
from utils.evaluation import evaluate_predictions, headline_table


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="predictions folder holding <i>.npz")
    parser.add_argument("--sift", action="store_true",
                        help="predictions of export_classical.py (no scores, non-unit descriptors)")
    parser.add_argument("-o", "--outputImg", action="store_true", help="save keypoint, warping and match figures")
    parser.add_argument("-r", "--repeatibility", action="store_true", help="repeatability and localization error")
    parser.add_argument("-homo", "--homography", action="store_true",
                        help="homography correctness, matching score and NN mAP")
    parser.add_argument("-plm", "--plotMatching", action="store_true",
                        help="save matching/<i>m.png (inliers green, outliers red)")
    parser.add_argument("--compat", action="store_true",
                        help="the reference's definitions of matching score and NN mAP (comparable to its table)")
    parser.add_argument("--top-k", type=int, default=1000, help="points per image for repeatability (default 1000)")
    parser.add_argument("--distance-thresh", type=float, default=3,
                        help="pixel distance of a correct correspondence (default 3)")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.distance_thresh <= 0:
        raise ValueError(f"--distance-thresh must be positive, got {args.distance_thresh}")
    results = evaluate_predictions(args.path, repeatability=args.repeatibility, homography=args.homography,
                                   output_images=args.outputImg, plot_matching=args.plotMatching, sift=args.sift,
                                   compat=args.compat, top_k=args.top_k, distance_thresh=args.distance_thresh)
    print(f"pairs evaluated: {results['n_pairs']}, files failed: {results['n_failed']}, "
          f"homography failures: {results['n_homography_failed']}")
    print(headline_table(results))
    if results["not_written"]:
        print(f"error: the results above could not be written: {results['not_written']}", file=sys.stderr)
        sys.exit(EXIT_ENVIRONMENT)


if __name__ == "__main__":
    main()
