"""The real images the shipped SuperPoint trains on, laid out as a COCO folder for the usual loaders.

    python -m pipeline.training_images --shared ../shared/data --output <DATA_PATH> [--size 240 320]

Writes <output>/COCO/train2014/ and <output>/COCO/val2014/ as grey PNGs of exactly `size` (H, W):
every image is centre-cropped to the aspect ratio of `size`, then resized with INTER_AREA, so that the
loaders' own resize is the identity and no image is stretched. Sources (all that may be used for
training here; never an HPatches image):

  train  the shared COCO train2014 images, the shared natural/ images (TUM, ICL-NUIM, phototourism,
         ScanNet samples), the shared KITTI frames (one 3:4 crop each, left, centre or right in turn,
         since consecutive frames differ little) and scikit-image's built-in training photographs
  val    the shared COCO val2014 images

Names are prefixed by their source (`coco_`, `natural_<folder>_`, `kitti_`, `builtin_`) so that they
are unique. The output is the same for the same inputs; a file that cannot be read is reported and
skipped.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from datasets import builtin
from utils.images import IMAGE_SUFFIXES, list_images, read_image
from utils.io import DataError, save_image

log = logging.getLogger(__name__)

NATURAL_SUFFIXES = IMAGE_SUFFIXES


def kitti_crop(image: np.ndarray, index: int, size: Sequence[int]) -> np.ndarray:
    """Frame `index`'s crop with the aspect ratio of size (H, W): left, centre, right in turn."""
    h, w = image.shape
    crop_w = min(w, int(round(h * size[1] / size[0])))
    left = [0, (w - crop_w) // 2, w - crop_w][index % 3]
    return image[:, left:left + crop_w]


def train_sources(shared: Path) -> Iterator[tuple[str, Path, bool]]:
    """(output name, file, is a KITTI frame) of every training image under the shared data folder."""
    for path in list_images(shared / "COCO" / "train2014"):
        yield f"coco_{path.stem}", path, False
    natural = shared / "natural"
    for folder in sorted(p for p in natural.iterdir() if p.is_dir()) if natural.is_dir() else []:
        for path in list_images(folder, NATURAL_SUFFIXES):
            yield f"natural_{folder.name}_{path.stem}", path, False
    kitti = shared / "KITTI"
    for folder in sorted(kitti.glob("*/image_02/data")) if kitti.is_dir() else []:
        for path in list_images(folder):
            yield f"kitti_{folder.parts[-3]}_{path.stem}", path, True


def write_folder(out_dir: Path, sources, size: Sequence[int]) -> int:
    """Write each source image cropped and resized into out_dir; returns how many were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, (name, path, is_kitti) in enumerate(sources):
        try:
            image = read_image(path)
        except DataError as e:
            log.error("skipped %s", e)
            continue
        if is_kitti:
            image = kitti_crop(image, i, size)
        save_image(out_dir / f"{name}.png", builtin.fit_to_size(image, size))
        written += 1
    return written


def write_training_images(shared: Path, output: Path, size: Sequence[int] = (240, 320)) -> dict:
    """Lay out the training and validation images under output/COCO; returns the counts per split."""
    images = builtin.builtin_images()
    train_names, _ = builtin.split_images(images)
    builtin_sources = [(f"builtin_{n}", images[n], False) for n in train_names]
    coco = Path(output) / "COCO"
    counts = {
        "train": write_folder(coco / "train2014", [*train_sources(Path(shared)), *builtin_sources], size),
        "val": write_folder(coco / "val2014", [(f"coco_{p.stem}", p, False)
                                               for p in list_images(Path(shared) / "COCO" / "val2014")], size),
    }
    log.info("wrote %d training and %d validation images under %s", counts["train"], counts["val"], coco)
    return counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--output", required=True, help="the DATA_PATH to write COCO/ into")
    parser.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = write_training_images(Path(args.shared), Path(args.output), args.size)
    print(f"{counts['train']} training and {counts['val']} validation images in {Path(args.output) / 'COCO'}")
    return counts


if __name__ == "__main__":
    main()
