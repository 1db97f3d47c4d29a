"""Inference speed per backend and precision: network forward, post-processing (heatmap + NMS + top-k
+ sub-pixel + descriptors) and full extraction, per image, on a real photograph.

    python benchmarks/inference.py [--device all|cpu|cuda] [--backends torch onnxruntime openvino]
        [--precision fp32 bf16] [--sizes 240x320 480x640] [--batches 1] [--runs 10] [--threads 1]
        [--compete 0 1] [--json FILE]

The unit of every row is `fp32_forward_ms`: the plain fp32 PyTorch forward (contiguous layout, no
autocast) of the same shape, timed in turn with the row's calls in every repeat, so that the ratios
(`extract_over_fp32_forward`) stay comparable on a busy machine. `used_precision` is what the backend
really ran (ONNX Runtime runs fp32; OpenVINO falls back to fp32 without bf16 units). `--compete N`
repeats the table with N single-threaded busy processes running. The header gives the CPU kind and load.
"""
import argparse
import statistics

import cv2
import numpy as np
import torch

from common import (REPO, CompetingProcesses, cpu_description, devices, machine_load, median_ms,  # noqa: E402
                    print_table, write_json)
import settings  # noqa: E402
from models.extractor import SuperPointExtractor  # noqa: E402
from utils import backends  # noqa: E402
from utils.keypoints import logits_to_heatmap  # noqa: E402

CONF = {"name": "SuperPointNet_pretrained", "detection_threshold": 0.015, "nms": 4, "top_k": 1000,
        "subpixel": {"enable": True, "patch_size": 5}}
COLUMNS = ["compete", "device", "size", "batch", "backend", "precision", "used_precision", "fp32_forward_ms",
           "forward_ms", "postprocess_ms", "extract_ms", "forward_over_fp32_forward", "extract_over_fp32_forward",
           "keypoints"]


def test_images(batch: int, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W): HPatches v_graffiti/1.ppm resized (DATA_PATH or ../shared/data), else a smooth texture."""
    for root in (settings.DATA_PATH, REPO.parent / "shared" / "data"):
        path = REPO / root / "HPatches" / "v_graffiti" / "1.ppm"
        if path.exists():
            grey = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (w, h), interpolation=cv2.INTER_AREA)
            return torch.from_numpy(grey.astype(np.float32) / 255)[None, None].expand(batch, -1, -1, -1).contiguous()
    low = torch.rand(batch, 1, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic").clamp(0, 1)


def weights_conf() -> dict:
    weights = REPO.parent / "shared" / "data" / "pretrained" / "superpoint_v1.pth"
    if not weights.exists():
        print(f"note: {weights} not found; random weights (keypoint counts not representative)")
    return dict(CONF, pretrained=str(weights) if weights.exists() else None)


def measure(conf, device, images, backend, precision, runs) -> dict:
    """One row: the plain fp32 forward (the unit) and the variant's forward, post-processing and
    extraction, timed in turn within each repeat so that all four see the same load; medians."""
    batch = images.shape[0]
    baseline = SuperPointExtractor(dict(conf, precision="fp32", channels_last=False), device=device)
    ex = SuperPointExtractor(dict(conf, backend=backend, precision=precision), device=device)
    images = images.to(device)
    out = ex.run_network(images)  # first call: exports / compiles
    calls = {"fp32_forward_ms": lambda: baseline.run_network(images), "forward_ms": lambda: ex.run_network(images),
             "postprocess_ms": lambda: ex.postprocess(logits_to_heatmap(out["semi"]), out["desc"]),
             "extract_ms": lambda: ex(images)}
    times = {key: [] for key in calls}
    for _ in range(runs + 1):
        for key, fn in calls.items():
            times[key].append(median_ms(fn, device, runs=1, warmup=0))
    ms = {key: statistics.median(values[1:]) / batch for key, values in times.items()}  # first: warm-up
    return {"device": device.type, "size": f"{images.shape[2]}x{images.shape[3]}", "batch": batch,
            "backend": type(ex.backend).name, "precision": precision, "used_precision": ex.backend.concrete_precision,
            **ms, "forward_over_fp32_forward": ms["forward_ms"] / ms["fp32_forward_ms"],
            "extract_over_fp32_forward": ms["extract_ms"] / ms["fp32_forward_ms"],
            "keypoints": sum(len(k) for k in ex(images)["keypoints"]) / batch, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all")
    parser.add_argument("--backends", nargs="+", default=[b for b in backends.BACKENDS if backends.installed(b)],
                        choices=list(backends.BACKEND_NAMES))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--sizes", nargs="+", default=["240x320", "480x640"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--compete", nargs="+", type=int, default=[0],
                        help="numbers of competing single-threaded busy processes, one table each")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    conf = weights_conf()
    print(f"CPU: {cpu_description()}; {args.threads} thread(s); {machine_load()} before the run")
    rows = []
    for compete in args.compete:
        with CompetingProcesses(compete):
            for device in devices(args.device):
                for size in args.sizes:
                    h, w = map(int, size.split("x"))
                    for batch in args.batches:
                        for backend in args.backends:
                            for precision in args.precision:
                                if device.type == "cuda" and backend not in ("torch", "auto"):
                                    continue
                                if device.type == "cpu" and precision == "fp16":
                                    continue
                                row = {"compete": compete, **measure(conf, device, test_images(batch, h, w),
                                                                      backend, precision, args.runs)}
                                rows.append(row)
                                print_table(rows[-1:], COLUMNS)
        print(f"({machine_load()} after the runs with {compete} competing process(es))")
    print()
    print(f"CPU: {cpu_description()}; {args.threads} thread(s)")
    print_table(rows, COLUMNS)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
