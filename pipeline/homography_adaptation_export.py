"""`export.py export_detector_homoAdapt`: keypoint labels by homography adaptation, in the
reference's output layout (one npz of points per image), with the fixes listed in its paragraphs below.

For every image of `data.dataset` (Coco, Kitti_inh, ImageFolder) in the split `data.export_folder`:
the heatmap aggregated over `data.homography_adaptation.num` homographies (utils.homography_adaptation),
then threshold / NMS / border / sub-pixel / top_k as configured under `model`. Writes
EXPER_PATH/<exper>/predictions/<export_folder>/<name>.npz with `pts` (N, 3) float32 [x, y, score]
sorted by score (KITTI: <drive>_<camera>/<frame>.npz), `<name>.png` overlays with --outputImg, and
`export.txt` (model, settings, counts, seconds per image).

Long runs: the output folder records the configuration that made it (run.json, utils.runs): the same
command again completes an interrupted export, keeping the labels that exist (files are written
atomically, so an interrupted write never looks like an output); another configuration is refused
unless --overwrite (which removes the old labels first). An unreadable image is reported and counted
(more than --max-bad-fraction of them stops the run); Ctrl-C or SIGTERM writes export.txt for what was
done. Under `torchrun --nproc_per_node=K` each process takes every K-th image.
"""
from __future__ import annotations

import argparse
import logging
import time
import zlib
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
import torch
from tqdm import tqdm

import settings
from datasets import get_dataset_class
from models import extractor as extractor_lib
from utils import homography_adaptation as ha
from utils import runs
from utils.config import IGNORED, OPEN, ConfigError, combine, load_yaml, merge
from utils.distributed import default_device, distributed_context, init_process_group
from utils.draw import draw_keypoints
from utils.io import DataError, remove_stale_temporaries, save_image, save_npz, write_text

log = logging.getLogger(__name__)

OVERLAY_SCALE = 3  # the reference draws the keypoints on the image upscaled 3 times
DATASETS = ("Coco", "coco", "Kitti_inh", "ImageFolder")  # datasets/ names whose samples this export reads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outputImg", action="store_true",
                        help="also write <name>.png: the keypoints drawn on the image upscaled x3")
    parser.add_argument("--weights", help="weights file (overrides model.pretrained / pretrained)")


def config_schema(dataset_name: str) -> dict:
    """The keys an export config may have (the reference's magicpoint_{coco,kitti}_export.yaml ones
    included); training-only keys are accepted and ignored."""
    return {
        "data": combine(get_dataset_class(dataset_name).default_conf, {"homography_adaptation": ha.default_conf}),
        # Labels take the fast path by default: the fastest backend at the fastest precision, whose labels
        # match fp32 ones (>= 95 % of points within 1 px, tests/test_backend_parity.py).
        "model": combine(extractor_lib.default_conf, {
            "backend": "auto", "precision": "auto",
            "batch_size": IGNORED, "eval_batch_size": IGNORED, "learning_rate": IGNORED}),
        "training": OPEN,
        "pretrained": None,
        "seed": 0,  # homographies of an image are drawn from (seed, its name): the same on resume or any shard
        "eval_iter": IGNORED,
        "front_end_model": IGNORED,
    }


def load_adaptation_config(path: str | Path, weights=None, precision=None, backend=None) -> dict:
    """The export config merged over `config_schema` of its dataset, with the command-line `weights`,
    `precision` and `backend` (None: the config's); no weights at all is a ConfigError."""
    raw = load_yaml(path)
    dataset_name = (raw.get("data") or {}).get("dataset")
    if dataset_name not in DATASETS:
        raise ConfigError(f"{path}: 'data.dataset' is {dataset_name!r}; homography adaptation exports "
                          f"one of {list(DATASETS)}")
    conf = extractor_lib.apply_overrides(merge(config_schema(dataset_name), raw, source=str(path)), weights,
                                         source=str(path), precision=precision, backend=backend)
    if not conf["model"]["pretrained"]:
        raise ConfigError(f"{path}: no weights: set 'pretrained' (or 'model.pretrained') to a MagicPoint "
                          f"checkpoint or MagicLeap's superpoint_v1.pth (with model.name SuperPointNet_pretrained)")
    conf["data"]["homography_adaptation"] = ha.merged_conf(conf["data"]["homography_adaptation"], source=str(path))
    return conf


def image_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def overlay(image: torch.Tensor, pts: np.ndarray) -> np.ndarray:
    """Keypoints (green) on the grey image (1, H, W) upscaled OVERLAY_SCALE times, as a BGR uint8 image."""
    grey = np.clip(np.rint(image[0].cpu().numpy() * 255), 0, 255).astype(np.uint8)
    big = cv2.resize(grey, None, fx=OVERLAY_SCALE, fy=OVERLAY_SCALE, interpolation=cv2.INTER_LINEAR)
    centres = (pts[:, :2] + 0.5) * OVERLAY_SCALE - 0.5  # pixel centres of the upscaled image
    return draw_keypoints(big, centres, radius=3)


def label_image(image: torch.Tensor, extractor, ha_conf: Mapping, rng: np.random.Generator) -> np.ndarray:
    """(1, H, W) image -> pts (N, 3) float32 [x, y, score], sorted by decreasing score."""
    heatmap = ha.adapt_heatmap(image[None].to(extractor.device), extractor.heatmap, ha_conf, rng)
    (points, scores), = extractor_lib.keypoints_from_heatmap(heatmap, extractor.conf)
    return torch.cat([points, scores[:, None]], dim=1).cpu().numpy().astype(np.float32)


def export_split(dataset, extractor, ha_conf: Mapping, out_dir: Path, seed: int = 0, output_img: bool = False,
                 rank: int = 0, world_size: int = 1, max_bad_fraction: float = runs.DEFAULT_MAX_BAD_FRACTION,
                 counts: dict | None = None) -> dict:
    """Label this process's share of `dataset` (every world_size-th image from `rank`).

    Returns counts {'images', 'written', 'existing', 'corrupt', 'points', 'seconds'} and 'corrupt_names'
    (filled in `counts` as it goes, when given, so that an interrupted run can still report them).
    Unreadable images are skipped and counted; more than `max_bad_fraction` of the share stops the run
    (runs.TooManyBadItems).
    """
    counts = counts if counts is not None else {}
    counts.update({"images": 0, "written": 0, "existing": 0, "corrupt": 0, "points": 0, "seconds": 0.0,
                   "corrupt_names": []})
    indices = range(rank, len(dataset), world_size)
    bad = runs.BadItems(len(indices), max_bad_fraction, "images")
    bar = tqdm(indices, desc=f"homography adaptation [{rank}/{world_size}]" if world_size > 1 else
               "homography adaptation", unit="img")
    for index in bar:
        name = dataset.samples[index]["name"]
        target = out_dir / f"{name}.npz"
        counts["images"] += 1
        remove_stale_temporaries(target)
        if target.exists():
            counts["existing"] += 1
            continue
        start = time.perf_counter()
        try:
            sample = dataset[index]
        except DataError as e:
            counts["corrupt"] += 1
            counts["corrupt_names"].append(name)
            bad.add(name, str(e))
            continue
        pts = label_image(sample["image"], extractor, ha_conf, image_rng(seed, name))
        # image_size lets training check that it uses the resize the labels were made at.
        save_npz(target, pts=pts, image_size=np.array(sample["image"].shape[-2:], dtype=np.int64))
        if output_img:
            save_image(out_dir / f"{name}.png", overlay(sample["image"], pts))
        counts["written"] += 1
        counts["points"] += len(pts)
        counts["seconds"] += time.perf_counter() - start
        bar.set_postfix(s_per_img=f"{counts['seconds'] / counts['written']:.2f}", pts=len(pts))
    return counts


def _gather_counts(counts: dict, world_size: int) -> dict:
    """Sum the counts of all processes (a no-op for one process)."""
    if world_size == 1:
        return counts
    import torch.distributed as dist

    keys = ["images", "written", "existing", "corrupt", "points", "seconds"]
    total = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(total)
    names = [None] * world_size
    dist.all_gather_object(names, counts["corrupt_names"])
    out = {k: (v.item() if k == "seconds" else int(v.item())) for k, v in zip(keys, total)}
    out["corrupt_names"] = sorted(n for part in names for n in part)
    return out


def summary_text(conf: Mapping, counts: Mapping, dataset, world_size: int) -> str:
    h = conf["data"]["homography_adaptation"]
    model = conf["model"]
    written = counts["written"]
    lines = [
        f"model: {model['pretrained']}",
        f"model_name: {model['name']}",
        f"precision: {model['precision']}, backend: {model['backend']}",
        f"dataset: {conf['data']['dataset']} ({dataset.task}), {len(dataset)} images",
        f"homographies: {h['num'] if h['enable'] else 1}",
        f"aggregation: {h['aggregation']}, filter_counts: {h['filter_counts']}, "
        f"valid_border_margin: {h['valid_border_margin']}, chunk: {h['chunk']}",
        f"detection_threshold: {model['detection_threshold']}, nms: {model['nms']}, "
        f"remove_borders: {model['remove_borders']}, top_k: {model['top_k']}, subpixel: {model['subpixel']['enable']}",
        f"processes: {world_size}",
        f"exported: {counts['written']}",
        f"kept_existing: {counts['existing']}",
        f"corrupt: {counts['corrupt']}" + (f" ({', '.join(counts['corrupt_names'])})" if counts["corrupt"] else ""),
        f"points_per_image: {counts['points'] / written:.1f}" if written else "points_per_image: n/a",
        f"seconds_per_image: {counts['seconds'] / written:.3f}" if written else "seconds_per_image: n/a",
    ]
    absent = getattr(dataset, "absent_drives", None)
    if absent:
        lines.append(f"absent_drives: {len(absent)} ({', '.join(absent)})")
    return "\n".join(lines) + "\n"


# What the export writes into predictions/<export_folder>/ (and --overwrite removes).
OUTPUTS = ("**/*.npz", "**/*.png", "export.txt")


def run(args) -> dict:
    conf = load_adaptation_config(args.config, args.weights, args.precision, getattr(args, "backend", None))
    ctx = distributed_context()
    rank, world_size = ctx.rank, ctx.world_size
    init_process_group(ctx, "gloo")
    data = conf["data"]
    exper_dir = Path(settings.EXPER_PATH) / args.exper_name
    out_dir = exper_dir / "predictions" / data["export_folder"]
    dataset = get_dataset_class(data["dataset"])(data, task=data["export_folder"], seed=conf["seed"],
                                                data_path=settings.DATA_PATH, source=str(args.config))
    device = default_device(ctx)
    extractor = extractor_lib.SuperPointExtractor(
        {k: v for k, v in conf["model"].items() if k in extractor_lib.default_conf}, device=device)
    # Every process decides (the same way); the first applies the decision before anyone writes.
    record = runs.make_record("export_detector_homoAdapt", conf, conf["model"]["pretrained"])
    plan = runs.plan_run(out_dir, record, OUTPUTS, resume=getattr(args, "resume", False),
                         overwrite=getattr(args, "overwrite", False),
                         may_change=("training",), implicit_resume=True)
    if rank == 0:
        plan.apply()
        write_text(exper_dir / "config.yml", Path(args.config).read_text())  # the file as given, as the reference
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    ha_conf = data["homography_adaptation"]
    log.info("homography adaptation of %d images (%s) with %d homographies, %s weights %s on %s -> %s",
             len(dataset), data["dataset"], ha_conf["num"], conf["model"]["name"], conf["model"]["pretrained"],
             device, out_dir)
    counts: dict = {}
    try:
        export_split(dataset, extractor, ha_conf, out_dir, seed=conf["seed"], output_img=args.outputImg, rank=rank,
                     world_size=world_size, counts=counts,
                     max_bad_fraction=getattr(args, "max_bad_fraction", runs.DEFAULT_MAX_BAD_FRACTION))
    except (KeyboardInterrupt, runs.TooManyBadItems) as e:
        # What was labelled is on disk (atomic writes); the summary says how far the run got.
        if rank == 0:
            write_text(out_dir / "export.txt", summary_text(conf, counts, dataset, world_size)
                       + f"stopped: {type(e).__name__} ({e}); rerun the same command to continue\n")
        raise
    counts = _gather_counts(counts, world_size)
    if rank == 0:
        write_text(out_dir / "export.txt", summary_text(conf, counts, dataset, world_size))
        plan.update(bad_items={"count": counts["corrupt"], "items": counts["corrupt_names"]})
        print(f"exported {counts['written']} images to {out_dir} ({counts['existing']} kept, "
              f"{counts['corrupt']} corrupt, {counts['seconds'] / max(counts['written'], 1):.2f} s/image)")
    if world_size > 1:
        dist.destroy_process_group()
    return counts
