"""MS-COCO images, where the reference's Coco dataset reads them: `<DATA_PATH>/COCO/<task>2014/*`.

Every image is read grey (OpenCV's BGR weights; the reference applied the RGB formula to BGR data),
resized to `preprocessing.resize` with INTER_AREA (no aspect-preserving crop, as the reference) and
scaled to float32 [0, 1]. The class serves two uses, as the reference's did:

* Export (homography adaptation; `data.labels` unset, or `homography_adaptation.enable`): the task is
  `export_folder` (train or val) and a sample is the image and its name.
* Training (`data.labels` set): task 'train' or 'val'. Only images with a label file
  `<labels>/<task>/<name>.npz` are used (key `pts`, (N, 3) x, y, score, as the export writes it at
  the same `resize`). A relative `labels` folder is looked up under EXPER_PATH first (where the export
  wrote it, e.g. `magicpoint_synth_homoAdapt_coco/predictions`), then under the working directory
  (where the reference looked). A sample is built by `datasets.data_tools.TrainingSample` from the
  image and its points: photometric augmentation (train only, as configured), homographic
  augmentation if enabled, labels at the rounded points, Gaussian soft labels with
  `gaussian_label.params.GaussianBlur.sigma`, and the warped pair (`warped_pair`: its own homography,
  the clean image warped then augmented on its own, warped labels, a valid mask eroded by
  `valid_border_margin`, `homographies` the pixel homography image -> warped image).
  Augmentations are seeded per access by `datasets.data_tools.AugmentationSeeds`.

Subclasses (Kitti_inh, Tum, ImageFolder) only list other files (`list_samples`); names with folders
(`<scene>/<frame>`) find their labels in the same sub-folders.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

import settings
from datasets.data_tools import AugmentationSeeds, TrainingSample, training_defaults
from utils.config import IGNORED, combine, merge
from utils.images import IMAGE_SUFFIXES, check_resize, find_folder, list_images, load_image
from utils.io import DataError, load_npz

log = logging.getLogger(__name__)

default_conf = combine(training_defaults, {
    "dataset": "Coco",
    "export_folder": "train",  # export: train or val, the image folder <export_folder>2014 and the output subfolder
    "preprocessing": {"resize": [240, 320]},  # [H, W], multiples of 8
    "labels": None,  # training: folder holding <task>/<name>.npz (relative: EXPER_PATH, then the working directory)
    # Keys of the reference's configs that are not used here.
    "name": IGNORED,
    "root": IGNORED,
    "root_split_txt": IGNORED,
    "alteration": IGNORED,
    "cache_in_memory": IGNORED,
    "validation_size": IGNORED,
    "homography_adaptation": IGNORED,  # read by the export (utils.homography_adaptation)
})


def read_points(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Keypoints (N, 2) float32 x, y of a label npz (`pts` (N, 2+) x, y[, score]); a malformed file is
    a DataError naming it. Labels that record their `image_size` (H, W), as this project's export
    does, must have been made at `size`: other labels would sit at the wrong pixels."""
    data = load_npz(path)
    if "pts" not in data:
        raise DataError(f"{path}: missing key 'pts'; it has {sorted(data)}")
    pts = data["pts"]
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise DataError(f"{path}: 'pts' has shape {pts.shape}; expected (N, 3) x, y, score")
    made_at = tuple(int(v) for v in data["image_size"]) if "image_size" in data else None
    if size is not None and made_at is not None and made_at != tuple(size):
        raise DataError(f"{path}: labels made at image size {made_at} (H, W) but data.preprocessing.resize "
                        f"is {list(size)}; use the resize of the label export")
    if not np.all(np.isfinite(pts[:, :2])):
        raise DataError(f"{path}: 'pts' holds NaN or infinite coordinates")
    # Labels of older exports do not record their size: points beyond the image betray another size.
    if size is not None and len(pts) and (pts[:, 0].max() > size[1] - 0.5 or pts[:, 1].max() > size[0] - 0.5
                                          or pts[:, :2].min() < -0.5):
        raise DataError(f"{path}: label points reach ({pts[:, 0].max():.1f}, {pts[:, 1].max():.1f}), outside the "
                        f"{size[0]}x{size[1]} (H x W) images of data.preprocessing.resize: labels made at another "
                        f"size? Export them again at this resize")
    return torch.from_numpy(np.ascontiguousarray(pts[:, :2], dtype=np.float32))


class Coco(torch.utils.data.Dataset):
    """COCO images of one split, as export or training samples (see the module docstring).

    conf: the `data` section, merged over `default_conf` (unknown keys are ConfigErrors). task: the
    split. seed: seeds the training augmentations. data_path / exper_path: DATA_PATH and EXPER_PATH
    (defaults from `settings`).
    Export sample: {'image': (1, H, W) float32 in [0, 1], 'name': file stem}. Training sample: the keys
    of `TrainingSample` and 'name'. `samples` lists {'image': path, 'name': name[, 'labels': path]}
    without reading anything, so callers can skip work by name.
    """

    default_conf = default_conf

    def __init__(self, conf: Mapping | None = None, task: str = "train", seed: int = 0,
                 data_path: str | Path | None = None, source: str = "data",
                 exper_path: str | Path | None = None):
        self.conf = merge(type(self).default_conf, conf, source=source)
        self.task, self.seed, self.source = task, seed, source
        self.size = check_resize(self.conf["preprocessing"]["resize"], source)
        adaptation = self.conf["homography_adaptation"]
        self.training = bool(self.conf["labels"]) and not (isinstance(adaptation, Mapping) and adaptation.get("enable"))
        # DATA_PATH is read at call time, so a changed settings.DATA_PATH (or environment) applies.
        self.samples = self.list_samples(Path(data_path if data_path is not None else settings.DATA_PATH))
        if self.training:
            self.build = TrainingSample(self.conf, task, source)
            self.samples = self.labelled(self.samples, Path(exper_path if exper_path is not None else settings.EXPER_PATH))
            self.seeds = AugmentationSeeds(seed, task, len(self.samples))

    def list_samples(self, data_path: Path) -> list[dict]:
        folder = data_path / "COCO" / f"{self.task}2014"
        if not folder.is_dir():
            raise DataError(f"COCO image folder not found: {folder} (expected DATA_PATH/COCO/<task>2014 with "
                            f"DATA_PATH={data_path}; set the DATA_PATH environment variable or data.export_folder)")
        images = list_images(folder)
        if not images:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)} files)")
        return [{"image": p, "name": p.stem} for p in images]

    def labelled(self, samples: list[dict], exper_path: Path) -> list[dict]:
        """The samples that have a label file `<labels>/<task>/<name>.npz`, with its path under 'labels'."""
        root = find_folder(self.conf["labels"], "labels", [exper_path, Path.cwd()], self.source)
        folder = root / self.task
        if not folder.is_dir():
            raise DataError(f"{self.source}: no '{self.task}' folder of labels in {root} (expected "
                            f"{folder}/<name>.npz, written by export.py export_detector_homoAdapt with "
                            f"data.export_folder: {self.task})")
        kept = [{**s, "labels": folder / f"{s['name']}.npz"} for s in samples]
        kept = [s for s in kept if s["labels"].is_file()]
        if not kept:
            raise DataError(f"{self.source}: none of the {len(samples)} {self.task} images has a label file in "
                            f"{folder} (expected <name>.npz, e.g. {folder / samples[0]['name']}.npz)")
        if len(kept) < len(samples):
            log.info("%s %s: %d of %d images have labels in %s; the others are skipped", type(self).__name__,
                     self.task, len(kept), len(samples), folder)
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Seed training augmentations by (seed, index, epoch) from now on (AugmentationSeeds)."""
        if self.training:
            self.seeds.set_epoch(epoch)

    def read_sample(self, index: int) -> dict:
        """The image of sample `index`, read and resized, with its name."""
        entry = self.samples[index]
        return {"image": load_image(entry["image"], self.size), "name": entry["name"]}

    def __getitem__(self, index: int) -> dict:
        if not self.training:
            return self.read_sample(index)
        index = range(len(self))[index]  # negative indices; IndexError beyond the end
        entry = self.samples[index]
        image = load_image(entry["image"], self.size)[0].numpy()
        sample = self.build(image, read_points(entry["labels"], self.size), self.seeds.rng(index))
        sample["name"] = entry["name"]
        return sample
