"""Match two images with SuperPoint and draw the matches:

    python match_pair.py IMG1 IMG2 [--weights W] [--output matches.png] [--resize H W | --max-edge N]
                         [--nn-thresh 0.7] [--top-k K] [--precision fp32|bf16|fp16|auto]
                         [--backend torch|onnxruntime|openvino|auto]

Mutual nearest-neighbour matches of the descriptors closer than --nn-thresh, a RANSAC homography
(3 px, seeded), and a PNG of both images with inliers in green and outliers in red. Prints the keypoint,
match and inlier counts. The network is picked from the weights file (MagicLeap's or a reference-format
checkpoint). Without --weights: the project's own SuperPoint, pretrained/superpoint_mix.pth
(pretrained/README.md says how it was trained and what it scores).
"""
import argparse
import sys
from pathlib import Path

from models.extractor import SuperPointExtractor
from pipeline.export_features import extract_file
from utils import draw, metrics
from utils.backends import BACKEND_NAMES
from utils.cli import exit_on_error
from utils.config import ConfigError, check_int, check_number
from utils.distributed import default_device
from utils.images import check_preprocessing, read_image
from utils.io import save_image

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image1")
    parser.add_argument("image2")
    parser.add_argument("--weights", help="weights file (default: the project's pretrained/superpoint_mix.pth)")
    parser.add_argument("--output", default="matches.png", help="PNG to write (default: matches.png)")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="network input size (multiples of 8)")
    parser.add_argument("--max-edge", type=int, help="shrink so the longer side is at most this")
    parser.add_argument("--nn-thresh", type=float, default=0.7, help="maximum descriptor distance of a match")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k best keypoints per image (0: all)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32")
    parser.add_argument("--backend", choices=list(BACKEND_NAMES), default="torch",
                        help="runtime of the network (utils/backends.py; auto: the fastest here)")
    return parser.parse_args(argv)


def check_arguments(args) -> None:
    """Command-line values checked before any work, blamed on the command line."""
    check_int(args.top_k, "--top-k", "command line", minimum=0, example=1000)
    check_number(args.nn_thresh, "--nn-thresh", "command line", low=0, open_low=True, example=0.7)
    if Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"command line: '--output' is {args.output!r}; expected a {' or '.join(OUTPUT_SUFFIXES)} "
                          f"file, e.g. matches.png")


@exit_on_error
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    images = [read_image(args.image1), read_image(args.image2)]  # clear errors before the model loads
    preprocessing = check_preprocessing({"resize": list(args.resize) if args.resize else None,
                                         "max_edge": args.max_edge}, "command line")
    extractor = SuperPointExtractor.from_weights(args.weights, device=default_device(),
                                                 top_k=args.top_k, precision=args.precision,
                                                 backend=args.backend)
    f1, f2 = (extract_file(extractor, path, preprocessing) for path in (args.image1, args.image2))
    matches = metrics.mutual_nn_matches(f1["keypoints"], f1["descriptors"].T, f2["keypoints"], f2["descriptors"].T,
                                        max_distance=args.nn_thresh)
    _, inliers = metrics.estimate_homography(matches.points[:, :2], matches.points[:, 2:])
    summary = (f"keypoints: {len(f1['keypoints'])} / {len(f2['keypoints'])}, matches: {len(matches.points)}, "
               f"inliers: {int(inliers.sum())}")
    figure = draw.add_title(draw.draw_matches(images[0], images[1], matches.points, inliers), summary)
    save_image(args.output, figure)
    print(summary)
    print(f"wrote {args.output}")
    return {"n_matches": len(matches.points), "n_inliers": int(inliers.sum())}


if __name__ == "__main__":
    main()
