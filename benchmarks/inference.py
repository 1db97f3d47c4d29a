"""Inference speed: network forward alone vs full extraction (forward + heatmap + NMS + top-k +
sub-pixel + descriptors), per image, at 240x320 and 480x640, batch 1 and 8.

    python benchmarks/inference.py [--device all|cpu|cuda] [--precision fp32 auto] [--runs 20] [--json FILE]

Each row also gives `fp32_forward_ms`: the plain fp32 forward of the same shape measured in the same
run, the unit that makes ratios comparable on a noisy machine.
"""
import argparse

import torch

from common import devices, median_ms, print_table, write_json  # noqa: E402  (adds the repo to sys.path)
from models.extractor import SuperPointExtractor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--sizes", nargs="+", default=["240x320", "480x640"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    conf = {"name": "SuperPointNet_pretrained", "detection_threshold": 0.015, "nms": 4, "top_k": 1000,
            "subpixel": {"enable": True, "patch_size": 5}}
    rows = []
    for device in devices(args.device):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        baseline = SuperPointExtractor(dict(conf, precision="fp32", channels_last=False), device=device)
        for size in args.sizes:
            h, w = map(int, size.split("x"))
            for batch in args.batches:
                g = torch.Generator().manual_seed(0)
                # A smooth random texture gives a realistic number of keypoints.
                images = torch.nn.functional.interpolate(torch.rand(batch, 1, h // 8, w // 8, generator=g),
                                                         size=(h, w), mode="bicubic").clamp(0, 1).to(device)
                unit = median_ms(lambda: baseline.run_network(images), device, args.runs) / batch
                for precision in args.precision:
                    ex = SuperPointExtractor(dict(conf, precision=precision), device=device)
                    forward = median_ms(lambda: ex.run_network(images), device, args.runs) / batch
                    extract = median_ms(lambda: ex(images), device, args.runs) / batch
                    n_kp = sum(len(k) for k in ex(images)["keypoints"]) / batch
                    rows.append({"device": device.type, "height": h, "width": w, "batch": batch,
                                 "precision": precision, "channels_last": ex.channels_last,
                                 "fp32_forward_ms": unit, "forward_ms": forward, "extract_ms": extract,
                                 "extract_over_forward": extract / forward, "extract_over_fp32_forward": extract / unit,
                                 "keypoints": n_kp, "threads": torch.get_num_threads()})
                    print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["device", "height", "width", "batch", "precision", "channels_last", "fp32_forward_ms",
                       "forward_ms", "extract_ms", "extract_over_forward", "extract_over_fp32_forward", "keypoints"])
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
