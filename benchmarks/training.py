"""Training speed: iterations/s of the trainer's step (forward, losses, backward, Adam) on MagicPoint
at 120x160, per batch size and precision, with data loading excluded (one batch reused) and included
(Synthetic Shapes rendered on the fly by --workers DataLoader workers, as configs/magicpoint_shapes_quick.yaml).

    python benchmarks/training.py [--device all|cpu|cuda] [--batches 32 64] [--precision fp32 auto]
                                  [--steps 3] [--runs 3] [--workers 2] [--threads N] [--json FILE]

Each number is the median over --runs runs of --steps iterations (after one warm-up iteration).
`vs_fp32` divides by the fp32 row of the same device, batch and loading, measured in the same run: the
unit that keeps ratios meaningful on a noisy machine. A precision that resolves to fp32 on this
hardware (`auto` without bf16 support) is not measured twice.
"""
import argparse
import os
import tempfile

import torch

from common import REPO, devices, print_table, seconds_per_call, write_json  # noqa: E402  (adds the repo to sys.path)
from pipeline import trainer as trainer_lib  # noqa: E402
from utils import precision as precision_lib  # noqa: E402
from utils.config import load_config  # noqa: E402

CONFIG = REPO / "configs" / "magicpoint_shapes_quick.yaml"


def make_trainer(device, batch: int, precision: str, workers: int, folder: str) -> trainer_lib.Trainer:
    conf = load_config(CONFIG, trainer_lib.default_conf)
    conf["model"]["batch_size"] = batch
    conf["training"].update(precision=precision, workers_train=workers)
    conf["data"]["on_the_fly"] = True
    conf["train_iter"] = 10 ** 9
    return trainer_lib.Trainer(conf, folder, device=device, source=str(CONFIG))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=list(precision_lib.PRECISIONS))
    parser.add_argument("--steps", type=int, default=3, help="iterations per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers when loading is included")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for device in devices(args.device):
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            precisions = ["fp32"] + [p for p in args.precision if p != "fp32"]
            for batch in args.batches:
                measured = {}  # concrete precision -> {loading: seconds}
                for precision in precisions:
                    concrete = precision_lib.resolve(precision, device)
                    if concrete not in measured:
                        tr = make_trainer(device, batch, precision, args.workers, folder)
                        batches = tr.data.batches(tr.n_iter)
                        fixed = next(batches)
                        measured[concrete] = {
                            "excluded": seconds_per_call(lambda: tr.train_step(fixed), device, args.steps, args.runs),
                            "included": seconds_per_call(lambda: tr.train_step(next(batches)), device,
                                                         args.steps, args.runs),
                        }
                        batches.close()
                        del tr
                    for loading, seconds in measured[concrete].items():
                        unit = measured["fp32"][loading]
                        rows.append({"device": device.type, "batch": batch, "precision": precision, "runs_as": concrete,
                                     "loading": loading, "seconds_per_it": seconds, "it_per_s": 1 / seconds,
                                     "images_per_s": batch / seconds,
                                     "vs_fp32": unit / seconds, "threads": torch.get_num_threads(),
                                     "workers": args.workers if loading == "included" else 0})
                        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["device", "batch", "precision", "runs_as", "loading", "seconds_per_it", "it_per_s",
                       "images_per_s", "vs_fp32"])
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
