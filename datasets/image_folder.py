"""Any folder of images (users' own data): every image under `data.root`, subfolders included.

Samples as `Coco` (grey, resized to `preprocessing.resize` with INTER_AREA, float32 [0, 1]); a sample's
name is its path under `root` without the suffix (e.g. `street/0001`), so exports mirror the folder
tree. A relative `root` is looked up under DATA_PATH first, then under the working directory.
"""
from __future__ import annotations

from pathlib import Path

from datasets.Coco import Coco
from utils.config import combine
from utils.images import IMAGE_SUFFIXES, list_images, resolve_path
from utils.io import DataError

default_conf = combine(Coco.default_conf, {
    "dataset": "ImageFolder",
    "root": None,
    "export_folder": "images",  # output subfolder of predictions/
})


class ImageFolder(Coco):
    """Images of a folder tree. `task` is unused (the folder is `data.root`)."""

    default_conf = default_conf

    def list_samples(self, data_path: Path) -> list[dict]:
        root = resolve_path(self.conf["root"], "root", data_path, self.source)
        images = list_images(root, IMAGE_SUFFIXES, recursive=True)
        if not images:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)} files, subfolders included)")
        return [{"image": p, "name": p.relative_to(root).with_suffix("").as_posix()} for p in images]
