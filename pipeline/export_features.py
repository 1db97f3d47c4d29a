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

import cv2
import h5py
import numpy as np
import torch
from tqdm import tqdm

import settings
from datasets.Coco import check_resize, list_images
from datasets.image_folder import IMAGE_SUFFIXES
from datasets.Kitti_inh import resolve_path
from models import extractor as extractor_lib
from utils.config import ConfigError, dump_config, load_config, require
from utils.geometry import scale_homography, warp_points
from utils.io import DataError, read_image, write_json

log = logging.getLogger(__name__)

FEATURE_KEYS = ("keypoints", "scores", "descriptors", "image_size")

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
    parser.add_argument("--overwrite", action="store_true", help="re-extract images already in features.h5")


def check_preprocessing(preprocessing: Mapping, source: str = "data") -> dict:
    """Validated `data.preprocessing`: at most one of resize ([H, W], multiples of 8) and max_edge (>= 8)."""
    resize, max_edge = preprocessing.get("resize"), preprocessing.get("max_edge")
    if resize is not None and max_edge is not None:
        raise ConfigError(f"{source}: set one of 'preprocessing.resize' and 'preprocessing.max_edge', not both")
    if resize is not None:
        check_resize(resize, source)
    if max_edge is not None and (not isinstance(max_edge, int) or max_edge < 8):
        raise ConfigError(f"{source}: 'preprocessing.max_edge' is {max_edge!r}; expected an integer >= 8")
    return {"resize": resize, "max_edge": max_edge}


def network_size(height: int, width: int, preprocessing: Mapping) -> tuple[int, int]:
    """(H, W) the image of size (height, width) is resized to before extraction (see the module doc)."""
    if preprocessing.get("resize"):
        return tuple(preprocessing["resize"])
    max_edge = preprocessing.get("max_edge")
    if max_edge and max(height, width) > max_edge:
        scale = max_edge / max(height, width)
        return max(8, int(height * scale) // 8 * 8), max(8, int(width * scale) // 8 * 8)
    return height, width


def load_image(path: str | Path, preprocessing: Mapping) -> tuple[torch.Tensor, tuple[float, float], tuple[int, int]]:
    """Grey image for the extractor: ((1, 1, H, W) float32 in [0, 1], (sx, sy) resize factors, original
    (height, width)). An unreadable file is a DataError naming it."""
    image = read_image(path)
    height, width = image.shape
    size = network_size(height, width, preprocessing)
    if size != (height, width):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    scale = (size[1] / width, size[0] / height)
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None, None], scale, (height, width)


def extract_file(extractor: extractor_lib.SuperPointExtractor, path: str | Path, preprocessing: Mapping) -> dict:
    """Features of one image file in hloc's layout (see the module doc), keypoints in original pixels."""
    image, scale, (height, width) = load_image(path, preprocessing)
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


def load_features_config(args) -> dict:
    conf = load_config(args.config, schema)
    require(conf, "data.root", args.config)
    if args.resize or args.max_edge:
        conf["data"]["preprocessing"] = {"resize": list(args.resize) if args.resize else None,
                                         "max_edge": args.max_edge}
    conf["data"]["preprocessing"] = check_preprocessing(conf["data"]["preprocessing"], args.config)
    if args.precision:
        conf["model"]["precision"] = args.precision
    conf["model"]["pretrained"] = args.weights or extractor_lib.weights_path(conf)
    return conf


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
                  preprocessing: Mapping, overwrite: bool = False) -> dict:
    """Write the features of every image under `root` to `output` (hloc layout); returns the counts."""
    images = list_images(root, IMAGE_SUFFIXES, recursive=True)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)} files, subfolders included)")
    partial = output.with_name(output.name + ".partial")
    written, kept, failed = 0, 0, []
    with _open_partial(output, partial, overwrite) as h5:
        for path in tqdm(images, desc="features", unit="image"):
            name = path.relative_to(root).as_posix()
            if _is_complete(h5, name):
                kept += 1
                continue
            try:
                features = extract_file(extractor, path, preprocessing)
            except DataError as e:
                log.error("skipped an image: %s", e)
                failed.append({"image": name, "error": str(e)})
                continue
            if name in h5:  # an incomplete group left by a crash
                del h5[name]
            group = h5.create_group(name)
            for key in FEATURE_KEYS:
                group.create_dataset(key, data=features[key])
            h5.flush()
            written += 1
    os.replace(partial, output)
    return {"n_images": len(images), "n_written": written, "n_kept_existing": kept, "n_failed": len(failed),
            "failed": failed}


def run(args) -> dict:
    conf = load_features_config(args)
    root = resolve_path(conf["data"]["root"], "root", Path(settings.DATA_PATH), args.config)
    exper_dir = Path(settings.EXPER_PATH) / args.exper_name
    exper_dir.mkdir(parents=True, exist_ok=True)
    dump_config(exper_dir / "config.yml", conf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = extractor_lib.SuperPointExtractor(conf["model"], device=device)
    output = exper_dir / "features.h5"
    log.info("exporting features of %s with %s (%s) to %s", root, conf["model"]["name"],
             conf["model"]["pretrained"] or "random weights", output)
    summary = export_folder(extractor, root, output, conf["data"]["preprocessing"], overwrite=args.overwrite)
    summary.update({"root": str(root), "weights": conf["model"]["pretrained"],
                    "preprocessing": conf["data"]["preprocessing"]})
    write_json(exper_dir / "features.json", summary)
    if summary["n_failed"]:
        log.warning("%d of %d images failed (listed in %s)", summary["n_failed"], summary["n_images"],
                    exper_dir / "features.json")
    print(f"features of {summary['n_written']} images written to {output} ({summary['n_kept_existing']} kept, "
          f"{summary['n_failed']} failed)")
    return summary
