"""`export.py export_descriptor`: keypoints, descriptors and matches of every HPatches pair.

Writes EXPER_PATH/<exper>/predictions/<i>.npz with the keys the reference's export_descriptor writes
(so its evaluation.py and ours read the same files):
image, warped_image (H, W) float32; prob, warped_prob (N, 3) float64 [x, y, score] sorted by score;
desc, warped_desc (N, D) float32 unit vectors; homography (3, 3) float64 pixel image -> warped;
matches (M, 4) float64 [x1, y1, x2, y2] (mutual nearest neighbours closer than model.nn_thresh).
Also `index.json` (which pair each <i>.npz holds), `export.json` (counts, settings) and config.yml.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

import settings
from datasets import patches_dataset
from models import extractor as extractor_lib
from utils import homography_adaptation as ha
from utils import runs
from utils.config import IGNORED, OPEN, combine, dump_config, load_config
from utils.distributed import default_device
from utils.images import check_resize
from utils.io import DataError, save_npz, write_json
from utils.keypoints import logits_to_heatmap
from utils.matching import mutual_nearest_neighbours

log = logging.getLogger(__name__)

# Every key of the reference's magicpoint_repeatability_heatmap.yaml and classical_descriptors.yaml, so
# its configs run unchanged; training-only keys are accepted and ignored.
schema = {
    "data": patches_dataset.default_conf,
    "front_end_model": IGNORED,
    "eval_iter": IGNORED,
    "seed": 0,
    "pretrained": None,
    "training": OPEN,
    "model": combine(extractor_lib.default_conf, {
        "batch_size": IGNORED, "eval_batch_size": IGNORED, "learning_rate": IGNORED, "rand_noise": IGNORED,
        # The reference's config has this key but its code ignored it; num > 1 turns adaptation on.
        "homography_adaptation": combine(ha.default_conf, {"num": 0}), "method": "sift", "params": OPEN,
    }),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"),
                        help="image size (overrides data.preprocessing.resize; the paper uses 480 640)")
    parser.add_argument("--nms", type=int, help="NMS radius in pixels (overrides model.nms)")
    parser.add_argument("--detection-threshold", type=float, help="overrides model.detection_threshold")
    parser.add_argument("--top-k", type=int, help="keep the k best points per image (overrides model.top_k)")
    parser.add_argument("--weights", help="weights file (overrides model.pretrained / pretrained)")
    parser.add_argument("--correspondence", action="store_true", help="accepted for compatibility; unused")


def load_export_config(path: str | Path, weights=None, resize=None, **model_keys) -> dict:
    """The config file merged with the defaults and the command-line overrides: `weights`, `resize`
    [H, W] (data.preprocessing.resize) and model keys (nms, detection_threshold, top_k, precision, backend;
    None keeps the config's value)."""
    conf = load_config(path, schema)
    if resize:
        conf["data"]["preprocessing"]["resize"] = list(check_resize(list(resize), "command line", "--resize"))
    return extractor_lib.apply_overrides(conf, weights, source=str(path), **model_keys)


# What the export writes into predictions/ (and --overwrite removes), evaluation's results included.
OUTPUTS = ("[0-9]*.npz", "index.json", "export.json", "result.txt", "result.npz", "result.json",
           "repeatibility*", "warping", "matching")


def prepare_output(exper_name: str, conf: Mapping, task: str, resume: bool = False, overwrite: bool = False):
    """(predictions folder, utils.runs.RunPlan): refuses a folder holding another configuration's
    predictions (see utils.runs); the plan is applied (stale outputs removed, run.json written)."""
    exper_dir = Path(settings.EXPER_PATH) / exper_name
    predictions = exper_dir / "predictions"
    record = runs.make_record(task, conf, conf["model"].get("pretrained"))
    plan = runs.plan_run(predictions, record, OUTPUTS, resume=resume, overwrite=overwrite,
                         may_change=("training",), implicit_resume=True)
    plan.apply()
    dump_config(exper_dir / "config.yml", conf)
    return predictions, plan


def export_pairs(dataset, describe_pair: Callable[[dict], dict], predictions: Path, resume: bool = False,
                 max_bad_fraction: float = runs.DEFAULT_MAX_BAD_FRACTION) -> dict:
    """Run `describe_pair(sample) -> {npz key: array}` on every pair and write `<i>.npz` atomically.

    A pair that cannot be read or described is reported and counted (its file, if an earlier run left
    one, is removed); the others go on. `index.json` lists exactly the files of this export, which is
    what evaluation reads; on Ctrl-C / SIGTERM it and `export.json` are written for the pairs done.
    Returns the counts written to export.json.
    """
    index, kept = [], 0
    bad = runs.BadItems(len(dataset), max_bad_fraction, "pairs")
    try:
        for i in tqdm(range(len(dataset)), desc="export", unit="pair"):
            pair = dataset.pairs[i]
            entry = {"index": i, "file": f"{i}.npz", "name": pair["name"], "image": str(pair["image"]),
                     "warped_image": str(pair["warped_image"]), "homography": str(pair["homography"])}
            path = predictions / entry["file"]
            if resume and path.exists():
                index.append(entry)
                kept += 1
                continue
            try:
                sample = dataset[i]
                arrays = describe_pair(sample)
            except DataError as e:
                path.unlink(missing_ok=True)
                bad.add(f"pair {i} ({pair['name']})", str(e))
                continue
            save_npz(path, image=sample["image"][0].numpy(), warped_image=sample["warped_image"][0].numpy(),
                     homography=sample["homography"].numpy().astype(np.float64), **arrays)
            index.append(entry)
    except (KeyboardInterrupt, runs.TooManyBadItems):
        _write_index(predictions, dataset, index, bad, kept, interrupted=True)
        raise
    summary = _write_index(predictions, dataset, index, bad, kept, interrupted=False)
    if bad:
        log.warning("%d of %d pairs failed (listed in %s)", len(bad), len(dataset), predictions / "export.json")
    return summary


def _write_index(predictions: Path, dataset, index: list, bad, kept: int, interrupted: bool) -> dict:
    write_json(predictions / "index.json", index)
    failed = [{"name": name, "error": error} for name, error in bad.items.items()]
    summary = {"n_pairs": len(dataset), "n_written": len(index) - kept, "n_kept_existing": kept,
               "n_failed": len(failed), "failed": failed, "complete": not interrupted,
               "skipped_missing_files": [{"name": n, "missing": m} for n, m in dataset.skipped]}
    write_json(predictions / "export.json", summary)
    return summary


def superpoint_describer(extractor: extractor_lib.SuperPointExtractor, nn_thresh: float,
                         adapt: Callable | None = None) -> Callable[[dict], dict]:
    """describe_pair for a SuperPoint extractor; `adapt(images, heatmap_fn)` replaces the single-pass
    heatmap with a homography-adapted one when given."""
    def describe(sample: dict) -> dict:
        images = torch.stack([sample["image"], sample["warped_image"]])
        out = extractor.run_network(images)
        heatmap = adapt(images) if adapt else logits_to_heatmap(out["semi"])
        pred = extractor.postprocess(heatmap, out["desc"])
        (kp1, kp2), (s1, s2) = pred["keypoints"], pred["keypoint_scores"]
        d1, d2 = pred["descriptors"]
        i1, i2, _ = mutual_nearest_neighbours(d1, d2, nn_thresh)
        matches = torch.cat([kp1[i1], kp2[i2]], dim=1).double()
        return {
            "prob": torch.cat([kp1, s1[:, None]], 1).double().cpu().numpy(),
            "warped_prob": torch.cat([kp2, s2[:, None]], 1).double().cpu().numpy(),
            "desc": d1.cpu().numpy(), "warped_desc": d2.cpu().numpy(),
            "matches": matches.cpu().numpy(),
        }
    return describe


def run(args) -> dict:
    conf = load_export_config(args.config, args.weights, args.resize, nms=args.nms, top_k=args.top_k,
                              detection_threshold=args.detection_threshold, precision=args.precision,
                              backend=args.backend)
    dataset = patches_dataset.PatchesDataset(conf["data"], data_path=settings.DATA_PATH, source=args.config)
    extractor = extractor_lib.SuperPointExtractor(
        {k: v for k, v in conf["model"].items() if k in extractor_lib.default_conf}, device=default_device())
    predictions, plan = prepare_output(args.exper_name, conf, args.task, args.resume, args.overwrite)
    log.info("exporting %d pairs of %s with %s (%s) to %s", len(dataset), dataset.root,
             conf["model"]["name"], conf["model"]["pretrained"] or "random weights", predictions)
    adapt = _adaptation(conf, extractor)
    summary = export_pairs(dataset, superpoint_describer(extractor, conf["model"]["nn_thresh"], adapt),
                           predictions, resume=plan.mode == "resume", max_bad_fraction=args.max_bad_fraction)
    plan.update(bad_items={"count": summary["n_failed"], "items": summary["failed"]})
    print(f"exported {summary['n_written']} pairs to {predictions} ({summary['n_failed']} failed)")
    return summary


def _adaptation(conf: Mapping, extractor) -> Callable | None:
    """Homography adaptation of the detector when model.homography_adaptation.num > 1."""
    ha_conf = ha.merged_conf(conf["model"]["homography_adaptation"])
    if not ha_conf["enable"] or int(ha_conf["num"]) <= 1:
        return None
    rng = np.random.default_rng(conf["seed"])
    return lambda images: ha.adapt_heatmap(images, extractor.heatmap, ha_conf, rng)
