"""`export.py export_features`: SuperPoint features of every image of a folder, in hloc's layout.

Reads every image under `data.root` (subfolders included; suffixes of datasets.image_folder) and writes
EXPER_PATH/<exper>/features.h5 with one group per image, named by its path relative to `data.root`
(e.g. `street/0001.jpg`, nested HDF5 groups as hloc writes them), holding
  keypoints    (N, 2) float32  x, y in pixels of the ORIGINAL image, pixel centres at integers
                               (utils/geometry.py; hloc's convention too)
  scores       (N,)   float32  detector scores, decreasing
  descriptors  (256, N) float32 unit vectors, transposed as hloc stores them
  image_size   (2,)   int64    [W, H] of the original image
plus features.json (counts, failed images, settings) and config.yml.

Image size for the network (it needs H and W divisible by 8), `data.preprocessing`:
  resize: [H, W]   resize to exactly H x W (multiples of 8), INTER_AREA;
  max_edge: M      shrink (never enlarge) so the longer side is at most M, each side rounded down to a
                   multiple of 8 (per-axis factors, so the aspect ratio changes by < 8 px);
  neither          full size; the network sees the top-left (H // 8 * 8, W // 8 * 8) crop.
Keypoints found on a resized image are mapped back with that image's own x and y factors
(x_orig = (x + 0.5) / s - 0.5, utils.geometry.scale_homography).

Resume and crash safety: the export writes to `features.h5.partial` (a copy of an existing
features.h5 when there is one), flushed after every image, and renames it to features.h5 when the
run ends; so features.h5 is always a complete file from a finished run. Images whose group is already
complete are skipped (`--overwrite` starts afresh); a run that crashed resumes from the partial file
(an unreadable one is discarded). An unreadable image is reported, counted and skipped.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np
import torch
from tqdm import tqdm

import settings
from models import extractor as extractor_lib
from utils import runs
from utils.config import dump_config, load_config, require
from utils.distributed import default_device
from utils.geometry import scale_homography, warp_points
from utils.images import (IMAGE_SUFFIXES, check_preprocessing, image_to_tensor, list_images, network_size,
                          read_image, resolve_path)
from utils.io import DataError, write_json

log = logging.getLogger(__name__)

FEATURE_KEYS = ("keypoints", "scores", "descriptors", "image_size")
OUTPUTS = ("features.h5", "features.h5.partial", "features.json")  # what --overwrite removes

default_preprocessing = {"resize": None, "max_edge": None}

schema = {
    "data": {"root": None, "preprocessing": default_preprocessing},
    "pretrained": None,
    "model": extractor_lib.default_conf,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="weights file (overrides model.pretrained / pretrained)")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"),
                        help="network input size (overrides data.preprocessing)")
    parser.add_argument("--max-edge", type=int, help="longer side at most this (overrides data.preprocessing)")


def extract_file(extractor: extractor_lib.SuperPointExtractor, path: str | Path, preprocessing: Mapping) -> dict:
    """Features of one image file in hloc's layout (see the module doc), keypoints in original pixels."""
    grey = read_image(path)
    height, width = grey.shape
    if min(height, width) < 8:
        raise DataError(f"{path}: image of size {height}x{width} is too small (the network needs at least 8x8)")
    size = network_size(height, width, preprocessing)
    image = image_to_tensor(grey, size)[None]
    scale = (size[1] / width, size[0] / height)
    pred = extractor.extract(image)
    keep = pred["mask"][0]
    to_original = torch.from_numpy(scale_homography(np.eye(3), scale, (1.0, 1.0))).to(pred["keypoints"].device)
    keypoints = warp_points(pred["keypoints"][0, keep].double(), to_original)
    return {
        "keypoints": keypoints.float().cpu().numpy(),
        "scores": pred["keypoint_scores"][0, keep].cpu().numpy(),
        "descriptors": pred["descriptors"][0, keep].T.contiguous().cpu().numpy(),
        "image_size": np.array([width, height], dtype=np.int64),
    }


def load_features_config(path: str | Path, weights=None, resize=None, max_edge=None, precision=None) -> dict:
    """The config file with the command-line overrides (None: the config's value); `resize` or
    `max_edge` replaces the whole data.preprocessing."""
    conf = load_config(path, schema)
    require(conf, "data.root", path)
    if resize or max_edge:
        conf["data"]["preprocessing"] = {"resize": list(resize) if resize else None, "max_edge": max_edge}
    conf["data"]["preprocessing"] = check_preprocessing(conf["data"]["preprocessing"], path)
    return extractor_lib.apply_overrides(conf, weights, precision=precision)


def _is_complete(h5: h5py.File, name: str) -> bool:
    group = h5.get(name)
    return isinstance(group, h5py.Group) and all(isinstance(group.get(k), h5py.Dataset) for k in FEATURE_KEYS)


def _open_partial(final: Path, partial: Path, overwrite: bool) -> h5py.File:
    """The partial file to append to (see the module doc for how it is chosen)."""
    if partial.exists() and not overwrite:
        try:
            h5py.File(partial, "r").close()
            log.info("resuming the interrupted export in %s", partial)
            return h5py.File(partial, "a")
        except OSError as e:
            log.warning("%s is unreadable (%s); discarding it", partial, e)
    partial.unlink(missing_ok=True)
    if final.exists() and not overwrite:
        try:
            h5py.File(final, "r").close()
        except OSError as e:
            raise DataError(f"{final}: not a readable HDF5 file ({e}); rerun with --overwrite") from e
        shutil.copyfile(final, partial)
    return h5py.File(partial, "a")


def export_folder(extractor: extractor_lib.SuperPointExtractor, root: Path, output: Path,
                  preprocessing: Mapping, overwrite: bool = False,
                  max_bad_fraction: float = runs.DEFAULT_MAX_BAD_FRACTION) -> dict:
    """Write the features of every image under `root` to `output` (hloc layout); returns the counts.

    Unreadable or too small images are skipped and counted; more than `max_bad_fraction` of them stops
    the export (runs.TooManyBadItems) with what was extracted kept in the partial file."""
    images = list_images(root, IMAGE_SUFFIXES, recursive=True)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)} files, subfolders included)")
    partial = output.with_name(output.name + ".partial")
    written, kept = 0, 0
    bad = runs.BadItems(len(images), max_bad_fraction, "images")
    with _open_partial(output, partial, overwrite) as h5:
        for path in tqdm(images, desc="features", unit="image"):
            name = path.relative_to(root).as_posix()
            if _is_complete(h5, name):
                kept += 1
                continue
            try:
                features = extract_file(extractor, path, preprocessing)
            except DataError as e:
                bad.add(name, str(e))
                continue
            if name in h5:  # an incomplete group left by a crash
                del h5[name]
            group = h5.create_group(name)
            for key in FEATURE_KEYS:
                group.create_dataset(key, data=features[key])
            h5.flush()
            written += 1
    os.replace(partial, output)
    return {"n_images": len(images), "n_written": written, "n_kept_existing": kept, "n_failed": len(bad),
            "failed": [{"image": name, "error": error} for name, error in bad.items.items()]}


def run(args) -> dict:
    conf = load_features_config(args.config, args.weights, args.resize, args.max_edge, args.precision)
    root = resolve_path(conf["data"]["root"], "root", Path(settings.DATA_PATH), args.config)
    exper_dir = Path(settings.EXPER_PATH) / args.exper_name
    extractor = extractor_lib.SuperPointExtractor(conf["model"], device=default_device())
    plan = runs.plan_run(exper_dir, runs.make_record("export_features", conf, conf["model"]["pretrained"]), OUTPUTS,
                         resume=args.resume, overwrite=args.overwrite, implicit_resume=True)
    plan.apply()
    dump_config(exper_dir / "config.yml", conf)
    output = exper_dir / "features.h5"
    log.info("exporting features of %s with %s (%s) to %s", root, conf["model"]["name"],
             conf["model"]["pretrained"] or "random weights", output)
    summary = export_folder(extractor, root, output, conf["data"]["preprocessing"], overwrite=args.overwrite,
                            max_bad_fraction=args.max_bad_fraction)
    plan.update(bad_items={"count": summary["n_failed"], "items": summary["failed"]})
    summary.update({"root": str(root), "weights": conf["model"]["pretrained"],
                    "preprocessing": conf["data"]["preprocessing"]})
    write_json(exper_dir / "features.json", summary)
    if summary["n_failed"]:
        log.warning("%d of %d images failed (listed in %s)", summary["n_failed"], summary["n_images"],
                    exper_dir / "features.json")
    print(f"features of {summary['n_written']} images written to {output} ({summary['n_kept_existing']} kept, "
          f"{summary['n_failed']} failed)")
    return summary
