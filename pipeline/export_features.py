"""`export.py export_features`: SuperPoint features of every image of a folder, in hloc's layout.

Reads every image under `data.root` (subfolders included; suffixes of datasets.image_folder) and writes
EXPER_PATH/<exper>/features.h5 with one group per image, named by its path relative to `data.root`
(e.g. `street/0001.jpg`, nested HDF5 groups as hloc writes them), holding
  keypoints    (N, 2) float32  x, y in pixels of the ORIGINAL image, pixel centres at integers
                               (utils/geometry.py; hloc's convention too), with hloc's attribute
                               `uncertainty` = 2 x the mean of the original / network size factors
                               (hloc's detection noise of SuperPoint, 2 px, in original pixels)
  scores       (N,)   float32  detector scores, decreasing
  descriptors  (256, N) float32 unit vectors, transposed as hloc stores them
  image_size   (2,)   int64    [W, H] of the original image
plus features.json (counts, failed images, settings) and config.yml. (hloc stores float16 by default;
float32 keeps full precision and hloc's readers take either.)

Images are read, sized and mapped back as hloc's `extract_features` does, so that the points are where
hloc's own SuperPoint puts them: grey as the decoder gives it, EXIF orientation ignored
(`data.preprocessing.exif_orientation: true` applies it instead; hloc and COLMAP do not), converted to
float, then resized (INTER_AREA, INTER_LINEAR when enlarging) to the network size, `data.preprocessing`:
  max_edge: M      hloc's resize_max: if the longer side exceeds M (or always, with resize_force: true),
                   scale by M / longer side, each side rounded to the nearest integer;
  resize: [H, W]   resize to exactly H x W (multiples of 8);
  neither          full size.
The network sees the whole (resized) image; at sizes that are not multiples of 8 the last H % 8 rows
and W % 8 columns get no keypoints (models.extractor). Keypoints are mapped back with the image's own
x and y factors in float32, as hloc: x_orig = (x + 0.5) * (W_orig / W) - 0.5.

Matches for hloc (`matching.pairs: <file>` or `--pairs FILE`): every pair of the pairs file (hloc's
format, `name0 name1` per line, names as in features.h5; a pair and its reverse are matched once) is
matched with `models.extractor.match` (`matching.max_distance`, `ratio`, `mutual`) and written to
EXPER_PATH/<exper>/matches.h5 in hloc's layout: group `name0/name1` ('/' inside a name becomes '-'),
holding `matches0` (N0,) int16 (index in name1's keypoints or -1) and `matching_scores0` (N0,) float16,
which hloc's triangulation and localisation read directly. A pair naming an image that is not in
features.h5 is reported and counted.

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
from utils.config import ConfigError, check_number, combine, dump_config, load_config, require
from utils.distributed import default_device
from utils.images import (IMAGE_SUFFIXES, check_preprocessing, list_images, network_size, read_grey_decoded,
                          resize_as_float, resolve_path)
from utils.io import DataError, write_json

log = logging.getLogger(__name__)

FEATURE_KEYS = ("keypoints", "scores", "descriptors", "image_size")
OUTPUTS = ("features.h5", "features.h5.partial", "features.json", "matches.h5", "matches.h5.partial")  # what --overwrite removes
DETECTION_NOISE = 2.0  # hloc's keypoint uncertainty of SuperPoint, in network-input pixels

default_preprocessing = {"resize": None, "max_edge": None, "resize_force": False, "exif_orientation": False}
default_matching = {"pairs": None, "max_distance": 0.7, "ratio": None, "mutual": True}

schema = {
    "data": {"root": None, "preprocessing": default_preprocessing},
    "pretrained": None,
    # The fast path by default (as label export): its keypoints match fp32 ones (tests/test_backend_parity.py).
    "model": combine(extractor_lib.default_conf, {"backend": "auto", "precision": "auto"}),
    "matching": default_matching,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="weights file (overrides model.pretrained / pretrained)")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"),
                        help="network input size (overrides data.preprocessing)")
    parser.add_argument("--max-edge", type=int, help="longer side at most this (overrides data.preprocessing)")
    parser.add_argument("--pairs", help="pairs file (hloc format): also write matches.h5 (overrides matching.pairs)")


def extract_file(extractor: extractor_lib.SuperPointExtractor, path: str | Path, preprocessing: Mapping) -> dict:
    """Features of one image file in hloc's layout (see the module doc), keypoints in original pixels;
    'uncertainty' is the keypoints' hloc attribute."""
    grey = read_grey_decoded(path, exif_orientation=preprocessing.get("exif_orientation", False))
    height, width = grey.shape
    if min(height, width) < 8:
        raise DataError(f"{path}: image of size {height}x{width} is too small (the network needs at least 8x8)")
    size = network_size(height, width, preprocessing)
    pred = extractor.extract(resize_as_float(grey, size))
    keep = pred["mask"][0]
    # hloc's mapping, in float32 as hloc computes it: factors original / network size per axis.
    factors = (np.array([width, height]) / np.array([size[1], size[0]])).astype(np.float32)
    keypoints = (pred["keypoints"][0, keep].cpu().numpy() + np.float32(0.5)) * factors - np.float32(0.5)
    return {
        "keypoints": keypoints.astype(np.float32),
        "uncertainty": np.float32(DETECTION_NOISE * factors.mean()),
        "scores": pred["keypoint_scores"][0, keep].cpu().numpy(),
        "descriptors": pred["descriptors"][0, keep].T.contiguous().cpu().numpy(),
        "image_size": np.array([width, height], dtype=np.int64),
    }


def check_matching(matching: Mapping, source: str) -> dict:
    """Checked `matching` section: max_distance in (0, 2] and ratio in (0, 1] or null, mutual a boolean."""
    out = dict(matching)
    for key, high in (("max_distance", 2.0), ("ratio", 1.0)):
        if out[key] is not None:
            out[key] = check_number(out[key], f"matching.{key}", source, low=0, high=high, open_low=True)
    if not isinstance(out["mutual"], bool):
        raise ConfigError(f"{source}: 'matching.mutual' is {out['mutual']!r}; expected true or false")
    return out


def load_features_config(path: str | Path, weights=None, resize=None, max_edge=None, precision=None,
                         backend=None) -> dict:
    """The config file with the command-line overrides (None: the config's value); `resize` or
    `max_edge` replaces both of data.preprocessing's size keys."""
    conf = load_config(path, schema)
    require(conf, "data.root", path)
    if resize or max_edge:  # command-line values are checked as such (a bad one is not the file's fault)
        given = check_preprocessing({"resize": list(resize) if resize else None, "max_edge": max_edge},
                                    "command line (--resize/--max-edge)")
        conf["data"]["preprocessing"].update(resize=given["resize"], max_edge=given["max_edge"])
    conf["data"]["preprocessing"] = check_preprocessing(conf["data"]["preprocessing"], path)
    conf["matching"] = check_matching(conf["matching"], path)
    conf = extractor_lib.apply_overrides(conf, weights, source=str(path), precision=precision, backend=backend)
    if not conf["model"]["pretrained"]:
        # Features of random weights are of no use: the shipped SuperPoint, with the descriptor sampling
        # it was trained with (the config's 'superglue' suits MagicLeap's weights).
        conf["model"].update(name="SuperPointNet_gauss2", pretrained=str(extractor_lib.default_weights()),
                             descriptor_sampling="exact")
    return conf


def _is_complete(h5: h5py.File, name: str) -> bool:
    group = h5.get(name)
    return (isinstance(group, h5py.Group) and all(isinstance(group.get(k), h5py.Dataset) for k in FEATURE_KEYS)
            and "uncertainty" in group["keypoints"].attrs)


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
            group["keypoints"].attrs["uncertainty"] = features["uncertainty"]
            h5.flush()
            written += 1
    os.replace(partial, output)
    return {"n_images": len(images), "n_written": written, "n_kept_existing": kept, "n_failed": len(bad),
            "failed": [{"image": name, "error": error} for name, error in bad.items.items()]}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Pairs of an hloc pairs file (`name0 name1` per line), each unordered pair once, in file order."""
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    pairs, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        names = line.split()
        if len(names) != 2:
            raise DataError(f"{path}:{number}: expected two image names separated by a space, got {line!r}")
        if (names[1], names[0]) not in seen and tuple(names) not in seen:
            seen.add(tuple(names))
            pairs.append(tuple(names))
    return pairs


def pair_name(name0: str, name1: str) -> str:
    """hloc's group name of a pair: the two names joined by '/', each with its own '/' replaced by '-'."""
    return "/".join((name0.replace("/", "-"), name1.replace("/", "-")))


def _read_features(h5: h5py.File, name: str) -> dict:
    if not _is_complete(h5, name):
        raise DataError(f"image {name!r} is not in {h5.filename}")
    descriptors = torch.from_numpy(h5[name]["descriptors"][()].T.astype(np.float32))
    return {"descriptors": descriptors[None]}


def export_matches(features: Path, pairs_path: Path, output: Path, matching: Mapping) -> dict:
    """Match every pair of `pairs_path` with the features of `features` and write `output` in hloc's
    layout (module doc), atomically. Returns the counts."""
    pairs = read_pairs(pairs_path)
    partial = output.with_name(output.name + ".partial")
    written, failed = 0, []
    with h5py.File(features, "r") as feats, h5py.File(partial, "w") as out:
        for name0, name1 in tqdm(pairs, desc="matches", unit="pair"):
            try:
                f0, f1 = _read_features(feats, name0), _read_features(feats, name1)
            except DataError as e:
                log.error("skipped the pair %s %s: %s", name0, name1, e)
                failed.append({"pair": f"{name0} {name1}", "error": str(e)})
                continue
            pred = extractor_lib.match(f0, f1, max_distance=matching["max_distance"], ratio=matching["ratio"],
                                       mutual=matching["mutual"])
            matches0 = pred["matches0"][0].numpy()
            group = out.create_group(pair_name(name0, name1))
            # hloc writes int16 indices; larger keypoint sets need int32, which its readers take too.
            group.create_dataset("matches0", data=matches0.astype(np.int16 if len(f1["descriptors"][0]) < 2 ** 15
                                                                  else np.int32))
            group.create_dataset("matching_scores0", data=pred["matching_scores0"][0].numpy().astype(np.float16))
            written += 1
    os.replace(partial, output)
    return {"n_pairs": len(pairs), "n_written": written, "n_failed": len(failed), "failed": failed}


def run(args) -> dict:
    conf = load_features_config(args.config, args.weights, args.resize, args.max_edge, args.precision,
                                getattr(args, "backend", None))
    if args.pairs:
        conf["matching"]["pairs"] = args.pairs
    root = resolve_path(conf["data"]["root"], "root", Path(settings.DATA_PATH), args.config)
    exper_dir = Path(settings.EXPER_PATH) / args.exper_name
    extractor = extractor_lib.SuperPointExtractor(conf["model"], device=default_device())
    plan = runs.plan_run(exper_dir, runs.make_record("export_features", conf, conf["model"]["pretrained"]), OUTPUTS,
                         resume=args.resume, overwrite=args.overwrite, implicit_resume=True)
    plan.apply()
    dump_config(exper_dir / "config.yml", conf)
    output = exper_dir / "features.h5"
    log.info("exporting features of %s with %s (%s) to %s", root, conf["model"]["name"],
             conf["model"]["pretrained"], output)
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
    if conf["matching"]["pairs"]:
        matches = export_matches(output, Path(conf["matching"]["pairs"]), exper_dir / "matches.h5", conf["matching"])
        summary["matches"] = matches
        write_json(exper_dir / "features.json", summary)
        print(f"matches of {matches['n_written']} pairs written to {exper_dir / 'matches.h5'} "
              f"({matches['n_failed']} failed)")
    return summary

