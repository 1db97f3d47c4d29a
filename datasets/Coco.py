"""MS-COCO images (reference-spec section 3.5): `<DATA_PATH>/COCO/<task>2014/*`.

Every image is read grey (OpenCV's BGR weights; the reference applied the RGB formula to BGR data),
resized to `preprocessing.resize` with INTER_AREA (no aspect-preserving crop, as the reference) and
scaled to float32 [0, 1]. For the homography-adaptation export the task is `export_folder` (train or
val) and a sample is the image and its name; the training sample (labels from `data.labels`, warped
pair, augmentations) builds on `read_sample`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
import torch

import settings
from utils.config import IGNORED, ConfigError, merge
from utils.io import DataError, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

default_conf = {
    "dataset": "Coco",
    "export_folder": "train",  # train or val: the image folder <export_folder>2014 and the output subfolder
    "preprocessing": {"resize": [240, 320]},  # [H, W], multiples of 8
    # Keys of the reference's training and export configs that the export does not use.
    "labels": IGNORED,
    "root": IGNORED,
    "root_split_txt": IGNORED,
    "alteration": IGNORED,
    "cache_in_memory": IGNORED,
    "gaussian_label": IGNORED,
    "augmentation": IGNORED,
    "warped_pair": IGNORED,
    "homography_adaptation": IGNORED,
}


def check_resize(resize, source: str = "data") -> tuple[int, int]:
    """`preprocessing.resize` as (H, W); anything but two positive multiples of 8 is a ConfigError."""
    size = tuple(resize or ())
    if len(size) != 2 or any(not isinstance(v, int) or v <= 0 or v % 8 for v in size):
        raise ConfigError(f"{source}: 'preprocessing.resize' is {resize!r}; expected [H, W], both positive "
                          f"multiples of 8 (e.g. [240, 320])")
    return size


def load_image(path: str | Path, size: tuple[int, int] | None) -> torch.Tensor:
    """Grey image as (1, H, W) float32 in [0, 1], resized to size (H, W) with INTER_AREA (None: as is).
    An unreadable file is a DataError naming it."""
    image = read_image(path)
    if size is not None and image.shape != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def list_images(folder: Path, suffixes=IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Image files of a folder (by suffix, case-insensitive), sorted."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in suffixes)


class Coco(torch.utils.data.Dataset):
    """COCO images of one split.

    Sample: {'image': (1, H, W) float32 in [0, 1], 'name': file stem}. `samples` lists
    {'image': path, 'name': name} without reading anything, so callers can skip work by name.
    """

    default_conf = default_conf

    def __init__(self, conf: Mapping | None = None, task: str = "train", seed: int = 0,
                 data_path: str | Path = settings.DATA_PATH, source: str = "data"):
        self.conf = merge(type(self).default_conf, conf, source=source)
        self.task, self.seed, self.source = task, seed, source
        self.size = check_resize(self.conf["preprocessing"]["resize"], source)
        self.samples = self.list_samples(Path(data_path))

    def list_samples(self, data_path: Path) -> list[dict]:
        folder = data_path / "COCO" / f"{self.task}2014"
        if not folder.is_dir():
            raise DataError(f"COCO image folder not found: {folder} (expected DATA_PATH/COCO/<task>2014 with "
                            f"DATA_PATH={data_path}; set the DATA_PATH environment variable or data.export_folder)")
        images = list_images(folder)
        if not images:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)} files)")
        return [{"image": p, "name": p.stem} for p in images]

    def __len__(self) -> int:
        return len(self.samples)

    def read_sample(self, index: int) -> dict:
        """The image of sample `index`, read and resized, with its name."""
        entry = self.samples[index]
        return {"image": load_image(entry["image"], self.size), "name": entry["name"]}

    def __getitem__(self, index: int) -> dict:
        return self.read_sample(index)
