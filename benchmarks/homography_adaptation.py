"""Homography adaptation speed: seconds per image (default 240x320, 100 homographies), in one run:

  loop      the reference's algorithm one warp at a time (warp, forward, mask, unwarp heatmap and mask
            separately, accumulate), then keypoints
  batched   utils.homography_adaptation.adapt_heatmap + keypoints, at each chunk size (--chunks)
  forwards  the network forwards of the same warps alone, at the best chunk size

Every row carries `forward_s_per_image`: the forwards alone at that row's chunk size, measured next to
it (interleaved repeats, best of each), and `forward_in_run_s`: the time the same run spent inside the
network. `over_forwards_in_run` = s_per_image / forward_in_run_s is the cost of adaptation on top of
the network (the target is at most 1.15) measured under the same load, which a shared machine needs.
`plain_forwards_per_image` divides s_per_image by `fp32_forward_s`, one plain fp32 PyTorch forward of
one image (contiguous layout, no autocast) measured in the same repeats: the unit of the issue targets.
`--backend` and `--precision` choose how the network runs (utils/backends.py); `used_precision` is
what it really ran. The header gives the CPU kind and the machine's load.

    python benchmarks/homography_adaptation.py [--device cpu] [--backend torch] [--precision fp32]
        [--num 100] [--chunks 1 8 32 100] [--repeats 2] [--threads N] [--json FILE]
"""
import argparse
import time

import numpy as np
import torch

from common import (REPO, cpu_description, machine_load, median_ms, print_table, synchronize,  # noqa: E402
                    write_json)
from utils.backends import BACKEND_NAMES  # noqa: E402
import settings  # noqa: E402
from utils.images import list_images, load_image  # noqa: E402
from models.extractor import SuperPointExtractor  # noqa: E402
from utils import homography_adaptation as ha  # noqa: E402
from utils.geometry import valid_mask, warp_image  # noqa: E402
from utils.keypoints import extract_keypoints  # noqa: E402

# The homographies of configs/magicpoint_coco_export.yaml.
PARAMS = {"translation": True, "rotation": True, "scaling": True, "perspective": True, "scaling_amplitude": 0.2,
          "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2, "allow_artifacts": True,
          "patch_ratio": 0.85}
KEYPOINTS = {"threshold": 0.015, "nms_radius": 4, "border": 4, "top_k": 600, "subpixel": True}


def test_image(size, device) -> torch.Tensor:
    """(1, 1, H, W): a COCO image of DATA_PATH (or ../shared/data) if there is one, else a smooth texture."""
    for root in (settings.DATA_PATH, REPO.parent / "shared" / "data"):
        folder = REPO / root / "COCO" / "val2014"
        if folder.is_dir() and list_images(folder):
            return load_image(list_images(folder)[0], size)[None].to(device)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 1, size[0] // 8, size[1] // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic").clamp(0, 1).to(device)


def loop_adaptation(image, heatmap_fn, num, margin, rng):
    """The reference's algorithm, one warp at a time (the baseline)."""
    h, w = image.shape[-2:]
    homs = ha.sample_adaptation_homographies(1, num, h, w, PARAMS, rng, image.device)[0]
    total = torch.zeros(1, 1, h, w, device=image.device)
    counts = torch.zeros(1, 1, h, w, device=image.device)
    for hom in homs:
        heat = heatmap_fn(warp_image(image, hom))[:, None]
        mask = valid_mask((h, w), hom, erosion_radius=margin)
        inverse = torch.linalg.inv(hom)
        total += warp_image(heat * mask, inverse)
        counts += warp_image(mask, inverse)
    return (total / counts.clamp_min(1e-6))[:, 0]


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class TimedNetwork:
    """heatmap_fn that adds up the time spent in the network."""

    def __init__(self, extractor):
        self.extractor, self.seconds = extractor, 0.0

    def __call__(self, images):
        synchronize(self.extractor.device)
        start = time.perf_counter()
        out = self.extractor.heatmap(images)
        synchronize(self.extractor.device)
        self.seconds += time.perf_counter() - start
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--backend", default="torch", choices=list(BACKEND_NAMES))
    parser.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--num", type=int, default=100, help="homographies per image")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--margin", type=int, default=3, help="valid_border_margin")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each mode (the best counts)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    weights = REPO.parent / "shared" / "data" / "pretrained" / "superpoint_v1.pth"
    conf = {"name": "SuperPointNet_pretrained", "pretrained": str(weights) if weights.exists() else None}
    extractor = SuperPointExtractor({**conf, "precision": args.precision, "backend": args.backend}, device=device)
    plain = SuperPointExtractor({**conf, "precision": "fp32", "channels_last": False}, device=device)
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} thread(s); {machine_load()} before the run")
    if not weights.exists():
        print(f"note: {weights} not found; random weights (keypoint counts not representative)")
    image = test_image(tuple(args.size), device)
    homs = ha.sample_adaptation_homographies(1, args.num, *args.size, PARAMS, np.random.default_rng(0), device)
    views = warp_image(image.expand(args.num, -1, -1, -1), homs[0])

    def forwards(network, chunk):
        for start in range(0, args.num, chunk):
            network(views[start:start + chunk])

    def batched(network, chunk):
        conf = {"num": args.num, "chunk": chunk, "valid_border_margin": args.margin,
                "homographies": {"params": PARAMS}}
        extract_keypoints(ha.adapt_heatmap(image, network, conf, rng=0), **KEYPOINTS)

    def loop(network, chunk):
        extract_keypoints(loop_adaptation(image, network, args.num, args.margin, np.random.default_rng(0)),
                          **KEYPOINTS)

    extractor.heatmap(views[:max(args.chunks)])  # warm-up
    modes = [("loop", 1, loop)] + [("batched", c, batched) for c in args.chunks]
    best = {}  # (mode, chunk) -> (seconds, seconds inside the network), the fastest run
    units = []  # the plain fp32 forward of one image, measured in every repeat
    for _ in range(args.repeats):  # interleaved, so that load changes hit every mode alike
        units.append(median_ms(lambda: plain.run_network(image), device, runs=5, warmup=1) / 1000)
        for mode, chunk, fn in modes:
            for key, f in (((mode, chunk), fn), (("forwards", chunk), forwards)):
                network = TimedNetwork(extractor)
                seconds = timed(lambda: f(network, chunk), device)
                if seconds < best.get(key, (float("inf"),))[0]:
                    best[key] = (seconds, network.seconds)
    fastest = min(args.chunks, key=lambda c: best[("batched", c)][0])
    rows = []
    for mode, chunk in [(m, c) for m, c, _ in modes] + [("forwards", fastest)]:
        seconds, in_network = best[(mode, chunk)]
        rows.append({"device": device.type, "backend": type(extractor.backend).name, "precision": args.precision,
                     "used_precision": extractor.backend.concrete_precision, "mode": mode, "chunk": chunk,
                     "s_per_image": seconds, "forward_s_per_image": best[("forwards", chunk)][0],
                     "forward_in_run_s": in_network, "over_forwards_in_run": seconds / in_network,
                     "fp32_forward_s": min(units), "plain_forwards_per_image": seconds / min(units)})
    print(f"CPU: {cpu_description()}; {machine_load()} after the run")
    print(f"{args.size[0]}x{args.size[1]}, {args.num} homographies, {torch.get_num_threads()} threads; "
          f"fastest chunk {fastest}")
    print_table(rows, list(rows[0]))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
