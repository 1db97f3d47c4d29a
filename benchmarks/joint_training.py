"""Joint-training speed and memory: sparse vs dense descriptor loss, SuperPointNet_gauss2 at batch 8,
240x320 (configs/superpoint_coco_train_heatmap.yaml with one loss or the other).

    python benchmarks/joint_training.py [--device all|cpu|cuda] [--batch 8] [--size 240 320]
                                        [--losses sparse dense] [--steps 2] [--runs 3] [--threads N] [--json FILE]

Per loss and device, in a fresh process (so that peak memories do not mix):
* `it_per_s`: trainer iterations per second (forward of image + warped image, detector and descriptor
  losses, backward, Adam), one batch reused so data loading is excluded; the median over --runs runs
  of --steps iterations, after one warm-up iteration (`seconds_per_it` its inverse). On one CPU thread a
  batch-8 iteration takes about 20 s: use --steps 1 there.
* `forward_ms`: the unit, measured in the same process: a plain fp32 forward of the same 2 x batch
  images (eval mode, no gradient), median over --runs runs of --steps calls. `step_in_forwards` is one
  iteration in these units: the ratio that stays meaningful on a loaded machine.
* `loss_ms`: the descriptor loss alone, forward + backward on the network's descriptors (median).
* `loss_peak_mb`: peak memory added by one descriptor-loss forward + backward (on top of its inputs).
* `step_peak_mb`: peak memory added by the training iterations over what the process held before
  them (model, optimizer state, the batch); `peak_mb`: the process's peak during them (CPU: resident
  set size, torch's libraries alone take several hundred MB; CUDA: max_memory_allocated).
CPU peaks are resident-set peaks, reset through Linux's /proc/self/clear_refs, measured with a fixed
glibc mmap threshold so that freed tensors leave the resident set.
The batch is built by the COCO training pipeline (datasets.data_tools.TrainingSample with the config's
photometric augmentation, warped pair and Gaussian labels) from random textured images and points.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import torch

from common import REPO, devices, print_table, seconds_per_call, synchronize, write_json  # noqa: E402  (adds the repo to sys.path)
from datasets.data_tools import TrainingSample  # noqa: E402
from pipeline import trainer as trainer_lib  # noqa: E402
from utils.config import load_config  # noqa: E402

CONFIG = REPO / "configs" / "superpoint_coco_train_heatmap.yaml"


class SyntheticPairs(torch.utils.data.Dataset):
    """`length` training samples from random smooth images with 200 random keypoints each."""

    def __init__(self, conf, height, width, length):
        self.conf, self.length, self.size = conf, length, (height, width)
        self.build = TrainingSample(conf, "train")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        h, w = self.size
        coarse = rng.random((h // 8 + 1, w // 8 + 1)).astype(np.float32)
        image = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=(h, w), mode="bicubic",
                                                align_corners=False)[0, 0].clamp(0, 1).numpy()
        points = torch.from_numpy(rng.uniform([0, 0], [w - 1, h - 1], (200, 2)).astype(np.float32))
        return {**self.build(image, points, rng), "name": str(index)}


def _proc_status(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device) -> None:
    """Restart peak-memory tracking (CPU: Linux's /proc/self/clear_refs resets the resident-set peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def current_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS") or 0


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def plain_forward(tr, images):
    """The network alone on (2B, 1, H, W) images in fp32, eval mode, no gradient (the trainer's input layout)."""
    tr.net.eval()
    try:
        return tr.forward(images, model=tr.net)
    finally:
        tr.net.train()


def measure(device_name: str, loss: str, batch: int, size, steps: int, runs: int) -> dict:
    """One row, measured in this process."""
    device = torch.device(device_name)
    conf = load_config(CONFIG, trainer_lib.default_conf)
    conf["model"]["batch_size"] = batch
    conf["model"]["sparse_loss"]["enable"] = loss == "sparse"
    conf["model"]["dense_loss"]["enable"] = loss == "dense"
    conf["data"]["preprocessing"]["resize"] = list(size)
    conf["training"].update(workers_train=0, precision="fp32")
    conf["train_iter"] = 10 ** 9
    data = SyntheticPairs(conf["data"], *size, length=batch)
    with tempfile.TemporaryDirectory() as folder:
        tr = trainer_lib.Trainer(conf, folder, device=device, datasets=(data, data), source=str(CONFIG))
        batches = tr.data.batches(tr.n_iter)
        fixed = next(batches)
        batches.close()
        # The descriptor loss alone, on the network's descriptors of this batch.
        images = torch.cat([fixed["image"], fixed["warped_img"]])
        with torch.no_grad():
            out = tr.forward(images)
        desc, warped = out["desc"][:batch], out["desc"][batch:]
        homographies = fixed["homographies"].to(device)
        mask = fixed["warped_valid_mask"].to(device)

        def loss_step():
            d, w = desc.clone().requires_grad_(True), warped.clone().requires_grad_(True)
            value, _ = tr.loss.descriptor_loss(d, w, homographies, mask)
            value.backward()

        loss_step()
        synchronize(device)
        before = current_bytes(device)
        reset_peak(device)
        loss_step()
        synchronize(device)
        loss_peak = peak_bytes(device) - before
        loss_seconds = seconds_per_call(loss_step, device, steps, runs)
        before = current_bytes(device)
        reset_peak(device)
        step_seconds = seconds_per_call(lambda: tr.train_step(fixed), device, steps, runs)
        peak = peak_bytes(device)
        forward_seconds = seconds_per_call(lambda: plain_forward(tr, images), device, steps, runs)
        return {"device": device.type, "loss": loss, "batch": batch, "size": f"{size[0]}x{size[1]}",
                "it_per_s": 1 / step_seconds, "seconds_per_it": step_seconds, "forward_ms": 1000 * forward_seconds,
                "step_in_forwards": step_seconds / forward_seconds,
                "loss_ms": 1000 * loss_seconds, "loss_peak_mb": loss_peak / 2 ** 20,
                "step_peak_mb": (peak - before) / 2 ** 20, "peak_mb": peak / 2 ** 20,
                "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--losses", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    parser.add_argument("--steps", type=int, default=2, help="iterations per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: 'device,loss' in a child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        device, loss = args.measure.split(",")
        print(json.dumps(measure(device, loss, args.batch, args.size, args.steps, args.runs)))
        return
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for device in devices(args.device):
        for loss in args.losses:
            cmd = [sys.executable, __file__, "--measure", f"{device.type},{loss}", "--batch", str(args.batch),
                   "--size", *map(str, args.size), "--steps", str(args.steps), "--runs", str(args.runs)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{device.type} {loss} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["device", "loss", "batch", "size", "it_per_s", "seconds_per_it", "forward_ms",
                       "step_in_forwards", "loss_ms", "loss_peak_mb", "step_peak_mb", "peak_mb", "threads"])
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
