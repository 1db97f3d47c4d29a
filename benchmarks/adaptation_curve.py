"""Repeatability and localisation error of a detector on HPatches-layout pairs against the number of
homographies of the homography adaptation (the paper's Figure: adaptation raises repeatability).

Each image of a pair gets the heatmap `utils.homography_adaptation.aggregate_over_homographies` makes
from the first N homographies of one seeded draw (so the N = 10 views are the first ten of the N = 100
views), then keypoints (`utils.keypoints.extract_keypoints`, NMS 4, border 4) and the repeatability
and localisation error of `utils.metrics.repeatability` (3 px), averaged over the pairs. Two point
budgets are measured side by side, because a heatmap averaged over many views has fewer maxima above a
fixed threshold, and repeatability rises with the number of points whatever their quality:

  thr   the export's default: score >= 0.015, at most 1,000 points (what `export.py export_descriptor` does)
  top   a fixed budget: the best `--top-k` points (default 300 at 240x320, the paper's protocol), any score

    python benchmarks/adaptation_curve.py --weights pretrained/magicpoint_synth.pth
        [--root ../shared/data/HPatches ...] [--nums 1 2 5 10 20 50 100] [--variant export ...]
        [--resize 240 320] [--precision auto] [--json FILE] [--plot FILE.png]

Variants (the homographies and aggregation of the adaptation):
  export    utils.homography_adaptation's defaults: the label exports' homographies (patch 0.85, scaling
            and perspective 0.2, artifacts allowed), masked mean
  zoom      the homography sampler's own defaults (TensorFlow SuperPoint's: patch 0.5, amplitudes 0.1,
            no artifacts), the adaptation's default before it was found to cost repeatability
  mild      the export's homographies without rotation and with amplitudes 0.1
  max       the export's homographies, max aggregation
"""
import argparse
import statistics
from pathlib import Path

import cv2
import numpy as np
import torch

from common import REPO, print_table, write_json  # noqa: E402  (adds the repo to sys.path)
from datasets.patches_dataset import PatchesDataset  # noqa: E402
from models.extractor import SuperPointExtractor  # noqa: E402
from utils import homography_adaptation as ha  # noqa: E402
from utils.geometry import HOMOGRAPHY_DEFAULTS  # noqa: E402
from utils.keypoints import extract_keypoints  # noqa: E402
from utils.metrics import repeatability  # noqa: E402

EXPORT_HOMOGRAPHIES = ha.ADAPTATION_HOMOGRAPHIES
VARIANTS = {
    "mild": {"homographies": {**EXPORT_HOMOGRAPHIES, "rotation": False, "scaling_amplitude": 0.1,
                              "perspective_amplitude_x": 0.1, "perspective_amplitude_y": 0.1}, "aggregation": "mean"},
    "export": {"homographies": EXPORT_HOMOGRAPHIES, "aggregation": "mean"},
    "zoom": {"homographies": dict(HOMOGRAPHY_DEFAULTS), "aggregation": "mean"},
    "max": {"homographies": EXPORT_HOMOGRAPHIES, "aggregation": "max"},
}
NMS, BORDER, THRESHOLD, THRESHOLD_TOP_K, DISTANCE = 4, 4, 0.015, 1000, 3


def adapted_heatmaps(extractor, image: torch.Tensor, nums, variant: dict, seed: int) -> dict:
    """{N: (H, W) heatmap} of one (1, 1, H, W) image for each N, from the first N of one draw."""
    h, w = image.shape[-2:]
    homs = ha.sample_adaptation_homographies(1, max(nums), h, w, variant["homographies"],
                                             np.random.default_rng(seed))
    conf = {"aggregation": variant["aggregation"], "valid_border_margin": 3}
    return {n: ha.aggregate_over_homographies(image, homs[:, :n], extractor.heatmap, conf)[0] for n in nums}


def budgets(heatmap: torch.Tensor, top_k: int) -> dict:
    """{'thr': (N, 3), 'top': (N, 3)} keypoints [x, y, score] under the two point budgets."""
    out = {}
    for name, (threshold, k) in {"thr": (THRESHOLD, THRESHOLD_TOP_K), "top": (1e-6, top_k)}.items():
        points, scores = extract_keypoints(heatmap[None], threshold, NMS, border=BORDER, top_k=k)[0]
        out[name] = torch.cat([points, scores[:, None]], 1).double().numpy()
    return out


def curve(extractor, datasets, nums, variant: dict, top_k: int, seed: int) -> list:
    """Rows {N, budget, repeatability, localization_error, points} averaged over every pair."""
    stats = {(n, b): {"rep": [], "mle": [], "pts": []} for n in nums for b in ("thr", "top")}
    for dataset in datasets:
        for i in range(len(dataset)):
            sample = dataset[i]
            shape = sample["image"].shape[-2:]
            first = adapted_heatmaps(extractor, sample["image"][None], nums, variant, seed + 2 * i)
            second = adapted_heatmaps(extractor, sample["warped_image"][None], nums, variant, seed + 2 * i + 1)
            for n in nums:
                p1, p2 = budgets(first[n], top_k), budgets(second[n], top_k)
                for b in ("thr", "top"):
                    r = repeatability(p1[b], p2[b], sample["homography"].numpy(), shape, keep_k_points=10 ** 6,
                                      distance_thresh=DISTANCE)
                    s = stats[(n, b)]
                    s["rep"].append(r.repeatability)
                    s["pts"].append((len(p1[b]) + len(p2[b])) / 2)
                    if r.localization_error >= 0:
                        s["mle"].append(r.localization_error)
    return [{"N": n, "budget": b, "repeatability": statistics.mean(s["rep"]),
             "localization_error": statistics.mean(s["mle"]) if s["mle"] else -1.0,
             "points": statistics.mean(s["pts"])} for (n, b), s in stats.items()]


def plot(rows: list, path: Path, title: str) -> None:
    """Repeatability (left) and localisation error (right) against log N, one line per variant/budget."""
    size, pad = 360, 50
    canvas = np.full((size + 2 * pad, 2 * (size + pad) + pad, 3), 255, np.uint8)
    series = sorted({(r["variant"], r["budget"]) for r in rows})
    colours = [(200, 60, 30), (30, 140, 30), (30, 60, 200), (150, 30, 150), (0, 150, 150), (90, 90, 90)]
    nums = sorted({r["N"] for r in rows})
    for panel, key in enumerate(("repeatability", "localization_error")):
        values = [r[key] for r in rows if r[key] >= 0]
        lo, hi = min(values), max(values)
        lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
        x0 = pad + panel * (size + pad)
        cv2.rectangle(canvas, (x0, pad), (x0 + size, pad + size), (0, 0, 0), 1)
        cv2.putText(canvas, f"{key} ({lo:.3f}..{hi:.3f})", (x0, pad - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)

        def at(n, v):
            return (int(x0 + size * np.log(n) / np.log(max(nums[-1], 2))), int(pad + size * (hi - v) / (hi - lo)))
        for colour, (variant, budget) in zip(colours, series):
            pts = [at(r["N"], r[key]) for r in sorted(rows, key=lambda r: r["N"])
                   if (r["variant"], r["budget"]) == (variant, budget) and r[key] >= 0]
            cv2.polylines(canvas, [np.array(pts, np.int32)], False, colour, 2)
            if panel == 0:
                cv2.putText(canvas, f"{variant}/{budget}", (pts[-1][0] - 90, pts[-1][1] - 6),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
        for n in nums:
            cv2.putText(canvas, str(n), (at(n, lo)[0] - 5, pad + size + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1)
    cv2.putText(canvas, title, (pad, size + 2 * pad - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--root", action="append", help="HPatches-layout folder (repeatable; default "
                        "../shared/data/HPatches)")
    parser.add_argument("--nums", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    parser.add_argument("--variant", nargs="+", default=["export"], choices=sorted(VARIANTS))
    parser.add_argument("--resize", type=int, nargs=2, default=[240, 320])
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    roots = args.root or [str(REPO.parent / "shared" / "data" / "HPatches")]
    datasets = [PatchesDataset({"root": r, "preprocessing": {"resize": args.resize}}) for r in roots]
    extractor = SuperPointExtractor.from_weights(args.weights, precision=args.precision)
    rows = []
    for name in args.variant:
        for row in curve(extractor, datasets, sorted(set(args.nums)), VARIANTS[name], args.top_k, args.seed):
            rows.append({"variant": name, **row})
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{args.weights}; {sum(len(d) for d in datasets)} pairs of {roots} at {args.resize}; precision "
          f"{args.precision} on a CPU with {cpu}; budgets: thr = score >= {THRESHOLD} (<= {THRESHOLD_TOP_K} "
          f"points), top = best {args.top_k}")
    print_table([{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows],
                ["variant", "budget", "N", "repeatability", "localization_error", "points"])
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot(rows, Path(args.plot), f"{Path(args.weights).name}, {sum(len(d) for d in datasets)} pairs, "
             f"{args.resize[0]}x{args.resize[1]}")
    return rows


if __name__ == "__main__":
    main()
