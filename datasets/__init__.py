"""Datasets, chosen by `data.dataset` (the reference's names). They produce tensors and labels and
never call a model.

Sample dicts use the reference's keys. Images are (1, H, W) float32 in [0, 1]; label maps (1, H, W)
float32; masks (1, H, W) float32 0/1. Homographies in samples are *pixel* homographies (utils.geometry
convention) mapping the image to the warped image: `homographies` (3, 3) and `inv_homographies`.
"""
from __future__ import annotations

import importlib

# data.dataset -> (module, class); imported lazily so that one dataset's imports never burden another.
DATASETS = {
    "SyntheticDataset_gaussian": ("datasets.SyntheticDataset_gaussian", "SyntheticDataset_gaussian"),
    "Coco": ("datasets.Coco", "Coco"),
    "coco": ("datasets.Coco", "Coco"),
    "Kitti_inh": ("datasets.Kitti_inh", "Kitti_inh"),
    "Tum": ("datasets.Tum", "Tum"),
    "hpatches": ("datasets.patches_dataset", "PatchesDataset"),
    "patches_dataset": ("datasets.patches_dataset", "PatchesDataset"),
    "ImageFolder": ("datasets.image_folder", "ImageFolder"),
}


def get_dataset_class(name: str):
    """The dataset class registered as `name`; an unknown name is a ValueError naming `data.dataset`."""
    if name not in DATASETS:
        raise ValueError(f"data.dataset is {name!r}; expected one of {sorted(DATASETS)}")
    module, cls = DATASETS[name]
    return getattr(importlib.import_module(module), cls)
