"""`make quickstart`: the whole pipeline, end to end, on built-in data, with the commands users run.

    python -m pipeline.quickstart [--output quickstart_output] [--budget default|smoke] [--magicpoint train|pretrained]

Stages (each one is the project's own command line, run in a subprocess with DATA_PATH and EXPER_PATH
pointing inside the output folder, so that nothing is written anywhere else):

1. data        scikit-image's sample photographs (datasets/builtin.py): training images as
               `data/COCO/{train,val}2014/`, held-out ones as HPatches-style sequences with known
               homographies in `data/HPatches/` (viewpoint `v_*` and illumination `i_*`).
2. magicpoint  `train4.py train_base` on synthetic shapes rendered on the fly (the quick config, shorter);
               with `--magicpoint pretrained`, the shipped pretrained/magicpoint_synth.pth instead.
3. labels      `export.py export_detector_homoAdapt` on the training images with that MagicPoint.
4. superpoint  `train4.py train_joint` from the MagicPoint weights on those labels.
5. evaluation  `export.py export_descriptor` + `evaluation.py` for the trained SuperPoint, for the same
               network with random weights, for SIFT (`export_classical.py`, `--sift`) and, when
               MagicLeap's weights are found, for them, and for the project's shipped
               pretrained/superpoint_mix.pth (row `shipped`).

It prints the seven-metric table and writes `summary.json` (one entry per row, each that row's
`result.json`), `table.md` and `timings.json` in the output folder. Every stage's config is written to
`configs/` there and its command echoed, so each can be re-run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import settings
from datasets import builtin
from models import SHIPPED_MAGICPOINT, SHIPPED_SUPERPOINT, shipped_weights
from utils.checkpoints import latest_checkpoint
from utils.cli import exit_on_error, setup_logging
from utils.config import dump_config, load_yaml
from utils.evaluation import HEADLINE_HEADER, headline_cells
from utils.io import write_json, write_text

REPO = Path(__file__).resolve().parent.parent

# Iterations and sizes per budget. `default` takes 15-18 minutes on 2 CPU cores in fp32 (the same run
# took 25 % longer at busier times of the shared machine); `smoke` runs every stage in a couple of
# minutes (the test suite's end-to-end check; its numbers mean little).
BUDGETS = {
    "default": {"magicpoint_iters": 800, "magicpoint_batch": 4, "homographies": 20,
                "joint_iters": 170, "joint_batch": 1, "eval_images": len(builtin.EVAL_IMAGES), "magicleap": True},
    "smoke": {"magicpoint_iters": 4, "magicpoint_batch": 2, "homographies": 2,
              "joint_iters": 2, "joint_batch": 1, "eval_images": 1, "magicleap": False},
}
VAL_IMAGES = 3  # training images also used to validate the joint training (monitoring only)


def write_config(out: Path, name: str, conf: dict) -> Path:
    path = out / "configs" / f"{name}.yaml"
    dump_config(path, conf)
    return path


def last_checkpoint(exper_dir: Path) -> Path:
    found = latest_checkpoint(exper_dir / "checkpoints")
    if found is None:
        raise RuntimeError(f"{exper_dir}/checkpoints holds no checkpoint; the training stage failed")
    return found


class StageFailed(RuntimeError):
    """A stage's script exited with an error (it printed why); `status` is its exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Runner:
    """Runs the project's scripts with DATA_PATH/EXPER_PATH inside the output folder, timing each stage."""

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"
        self.logs = out / "logs"
        self.timings: dict[str, float] = {}
        self.env = {**os.environ, "DATA_PATH": str(self.data), "EXPER_PATH": str(self.logs)}

    def script(self, stage: str, *args: str) -> None:
        command = [sys.executable, str(REPO / args[0]), *args[1:]]
        shown = " ".join(["python", *args])
        print(f"\n[{stage}] DATA_PATH={self.data} EXPER_PATH={self.logs} {shown}", flush=True)
        start = time.perf_counter()
        # The output folder is the working directory, so tensorboard's runs/ lands there too.
        result = subprocess.run(command, cwd=self.out, env=self.env)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        if result.returncode != 0:
            raise StageFailed(f"stage '{stage}' failed (exit {result.returncode}): {shown}", result.returncode)


def prepare_data(out: Path, seed: int, eval_images: int) -> dict:
    """Write the training images and the evaluation sequences (of the first `eval_images` held-out
    images); returns what was written."""
    images = builtin.builtin_images()
    train_names, eval_names = builtin.split_images(images)
    eval_names = eval_names[:eval_images]
    coco = out / "data" / "COCO"
    builtin.write_image_folder(coco / "train2014", train_names, images)
    builtin.write_image_folder(coco / "val2014", train_names[:VAL_IMAGES], images)
    sequences = builtin.write_sequences(out / "data" / "HPatches", eval_names, images, seed=seed)
    return {"train_images": train_names, "eval_sequences": sequences}


def train_magicpoint(run: Runner, budget: dict, seed: int) -> Path:
    conf = load_yaml(REPO / "configs/magicpoint_shapes_quick.yaml")
    iters = budget["magicpoint_iters"]
    conf["model"].update(batch_size=budget["magicpoint_batch"], eval_batch_size=budget["magicpoint_batch"])
    conf.update(train_iter=iters, save_interval=iters, validation_interval=iters, tensorboard_interval=max(1, iters // 10),
                validation_size=5, seed=seed)
    path = write_config(run.out, "magicpoint", conf)
    run.script("magicpoint", "train4.py", "train_base", str(path), "magicpoint_quick", "--eval", "--overwrite")
    return last_checkpoint(run.logs / "magicpoint_quick")


def export_labels(run: Runner, budget: dict, magicpoint: Path) -> str:
    conf = load_yaml(REPO / "configs/magicpoint_coco_export.yaml")
    conf["data"]["homography_adaptation"]["num"] = budget["homographies"]
    conf["pretrained"] = str(magicpoint)
    exper = "magicpoint_quick_homoAdapt"
    for split in ("train", "val"):
        conf["data"]["export_folder"] = split
        path = write_config(run.out, f"labels_{split}", conf)
        run.script("labels", "export.py", "export_detector_homoAdapt", str(path), exper, "--overwrite")
    return f"{exper}/predictions"


def train_superpoint(run: Runner, budget: dict, magicpoint: Path, labels: str, seed: int) -> Path:
    conf = load_yaml(REPO / "configs/superpoint_coco_train_heatmap.yaml")
    iters = budget["joint_iters"]
    conf["data"]["labels"] = labels
    conf["training"].update(workers_train=1, workers_val=0)
    # The config's learning rate (1e-4). Measured on the built-in pairs: at 1e-3 this stage lowered the
    # MagicPoint's repeatability (0.646 -> 0.624); at 1e-4 it raised it (0.682 -> 0.722).
    conf["model"].update(batch_size=budget["joint_batch"], eval_batch_size=budget["joint_batch"])
    conf.update(retrain=False, reset_iter=True, pretrained=str(magicpoint), train_iter=iters, save_interval=iters,
                validation_interval=iters, tensorboard_interval=max(1, iters // 10), validation_size=VAL_IMAGES,
                seed=seed)
    path = write_config(run.out, "superpoint", conf)
    run.script("superpoint", "train4.py", "train_joint", str(path), "superpoint_quick", "--eval", "--overwrite")
    return last_checkpoint(run.logs / "superpoint_quick")


def random_weights(out: Path, seed: int) -> Path:
    """A checkpoint of the SuperPoint network as initialised, before any training."""
    import torch

    from models import get_model
    from utils.checkpoints import save_checkpoint

    torch.manual_seed(seed)
    return save_checkpoint(out / "logs" / "random_init" / "checkpoints", 0, get_model("SuperPointNet_gauss2"))


def magicleap_weights() -> Path | None:
    """MagicLeap's superpoint_v1.pth where the project looks for it (pretrained/, DATA_PATH/pretrained/)."""
    for folder in (REPO / "pretrained", Path(settings.DATA_PATH) / "pretrained", REPO.parent / "shared/data/pretrained"):
        if (folder / "superpoint_v1.pth").is_file():
            return (folder / "superpoint_v1.pth").resolve()
    return None


def evaluate(run: Runner, row: str, weights: Path | None, network: str = "SuperPointNet_gauss2") -> dict:
    exper = f"quickstart_eval_{row}"
    if row == "sift":
        conf = load_yaml(REPO / "configs/classical_descriptors.yaml")
        path = write_config(run.out, f"eval_{row}", conf)
        run.script("evaluation", "export_classical.py", "export_descriptor", str(path), exper, "--overwrite")
    else:
        conf = load_yaml(REPO / "configs/magicpoint_repeatability_heatmap.yaml")
        conf["model"].update(name=network, pretrained=str(weights))
        path = write_config(run.out, f"eval_{row}", conf)
        run.script("evaluation", "export.py", "export_descriptor", str(path), exper, "--overwrite")
    predictions = run.logs / exper / "predictions"
    flags = ["--repeatibility", "--homography"] + (["--sift"] if row == "sift" else [])
    if row == "trained":
        flags += ["--outputImg", "--plotMatching"]  # figures of the trained model, for people to look at
    run.script("evaluation", "evaluation.py", str(predictions), *flags)
    with open(predictions / "result.json") as f:
        return json.load(f)


def results_table(summary: dict) -> str:
    """Markdown table, one row per entry of summary (name -> result.json object)."""
    header = ["model", *HEADLINE_HEADER, "pairs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, res in summary.items():
        lines.append("| " + " | ".join([name, *headline_cells(res), str(res.get("n_pairs", "n/a"))]) + " |")
    return "\n".join(lines)


def run_quickstart(out: Path, budget_name: str = "default", seed: int = 0, magicpoint: str = "train") -> dict:
    """The pipeline into `out`. magicpoint: 'train' (stage 2 trains one) or 'pretrained' (the shipped
    pretrained/magicpoint_synth.pth, which skips stage 2)."""
    budget = BUDGETS[budget_name]
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out)
    start = time.perf_counter()
    data = prepare_data(out, seed, budget["eval_images"])
    run.timings["data"] = time.perf_counter() - start
    print(f"[data] {len(data['train_images'])} training images, {len(data['eval_sequences'])} evaluation "
          f"sequences (5 pairs each) under {run.data}", flush=True)

    if magicpoint == "pretrained":
        magicpoint = shipped_weights(SHIPPED_MAGICPOINT)
        print(f"[magicpoint] the shipped {magicpoint} (no MagicPoint training)", flush=True)
    else:
        magicpoint = train_magicpoint(run, budget, seed)
    labels = export_labels(run, budget, magicpoint)
    superpoint = train_superpoint(run, budget, magicpoint, labels, seed)

    summary = {"trained": evaluate(run, "trained", superpoint),
               "random_init": evaluate(run, "random_init", random_weights(out, seed)),
               "sift": evaluate(run, "sift", None)}
    if SHIPPED_SUPERPOINT.is_file():
        summary["shipped"] = evaluate(run, "shipped", SHIPPED_SUPERPOINT)
    magicleap = magicleap_weights() if budget["magicleap"] else None
    if magicleap is not None:
        summary["magicleap"] = evaluate(run, "magicleap", magicleap, network="SuperPointNet_pretrained")
    run.timings["total"] = time.perf_counter() - start

    table = results_table(summary)
    # Printed before anything is written: a disk that refuses the files does not hide the numbers.
    print(f"\nQuickstart: HPatches-style evaluation on {len(data['eval_sequences'])} built-in sequences "
          f"(240x320, NMS 4, threshold 0.015, top-k 1000; budget '{budget_name}')\n")
    print(table)
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.timings.items()), flush=True)
    write_json(out / "summary.json", summary)
    write_json(out / "timings.json", {k: round(v, 1) for k, v in run.timings.items()})
    write_text(out / "table.md", table + "\n")
    print(f"\nEverything is in {out}: summary.json, table.md, timings.json, configs/, logs/ (checkpoints, "
          f"predictions, figures), runs/ (tensorboard --logdir {out / 'runs'})")
    return summary


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="quickstart_output", help="folder for everything it writes")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                        help="default: 15-18 min on 2 CPU cores; smoke: every stage in a few minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magicpoint", choices=["train", "pretrained"], default="train",
                        help="train: stage 2 trains a MagicPoint; pretrained: start from the shipped "
                             "pretrained/magicpoint_synth.pth (about 9 minutes less)")
    args = parser.parse_args(argv)
    setup_logging(False)
    try:
        run_quickstart(Path(args.output), args.budget, args.seed, args.magicpoint)
    except StageFailed as e:  # the stage printed its own error; say which stage, keep its status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status if 0 < e.status < 256 else 1)


if __name__ == "__main__":
    main()
