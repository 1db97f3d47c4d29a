"""Synthetic Shapes for MagicPoint (the reference's dataset of the same name): rendered shapes with exact corner labels,
augmented photometrically then homographically (`datasets.data_tools.TrainingSample`).

The shapes come from `datasets.synthetic_shapes`, either from its disk cache under
`DATA_PATH/synthetic_shapes_<suffix>/` (generated on first use, regenerated when the generation
parameters change) or, with `on_the_fly: true`, rendered in the DataLoader workers with no cache; both
give the same images for the same configuration.

Randomness. Training augmentations come from one `np.random.Generator` per access, seeded by:
* `[seed, index, epoch]` once `set_epoch(epoch)` has been called (the trainer calls it before every
  epoch): a sample's augmentation then depends on nothing else, not on the DataLoader workers, the
  rank or the access order, so a resumed run sees exactly the augmentations of an uninterrupted one;
* otherwise `[seed, index, draw, worker_seed]`: `draw` counts how often this dataset object has
  produced sample `index` in this process and `worker_seed` is torch's seed of the current DataLoader
  worker (`get_worker_info().seed`, drawn anew for each epoch's workers from the torch generator; 0
  outside workers). A seeded run is reproducible and every epoch, worker and access is augmented anew.
Validation samples depend on (seed, index) only, so every validation sees the same set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

import settings
from datasets import synthetic_shapes, synthetic_shapes_cache
from datasets.data_tools import AugmentationSeeds, TrainingSample, training_defaults
from utils.config import IGNORED, combine, merge
from utils.images import check_resize, read_image

default_conf = combine(training_defaults, synthetic_shapes.generation_defaults, {
    "dataset": "SyntheticDataset_gaussian",
    "on_the_fly": False,  # render in the DataLoader workers instead of reading the cache
    "workers": None,  # processes generating the cache (None: every usable core)
    # TF-era keys of the reference's configs, accepted and unused (`on-the-fly` is `on_the_fly` here).
    "cache_in_memory": IGNORED,
    "add_augmentation_to_test_set": IGNORED,
    "validation_size": IGNORED,
    "test_size": IGNORED,
    "num_parallel_calls": IGNORED,
    "on-the-fly": IGNORED,
    "name": IGNORED,
})

TASK_SPLITS = {"train": "training", "val": "validation"}


class SyntheticDataset_gaussian(torch.utils.data.Dataset):
    """Synthetic shapes of one split.

    conf: the `data` section (the reference's magicpoint_shapes_pair.yaml keys), merged over
    `default_conf`; unknown keys are ConfigErrors naming them. task: 'train' (split `training`) or
    'val' (split `validation`).
    seed: seeds the augmentation (see the module docstring); the shapes themselves depend on
    `generation.random_seed`. data_path: where the cache lives (unused on the fly).
    Samples hold the keys of `datasets.data_tools.TrainingSample` and `name` ('<primitive>_<index>').
    """

    default_conf = default_conf

    def __init__(self, conf: Mapping | None = None, task: str = "train", seed: int = 0,
                 data_path: str | Path | None = None, source: str = "data"):
        if task not in TASK_SPLITS:
            raise ValueError(f"task is {task!r}; expected one of {list(TASK_SPLITS)}")
        self.conf = merge(type(self).default_conf, conf, source=source)
        check_resize(self.conf["preprocessing"]["resize"], source)  # the network's 8-pixel cells
        self.task, self.split, self.seed = task, TASK_SPLITS[task], int(seed)
        self.build = TrainingSample(self.conf, task, source)
        self.shapes = synthetic_shapes.shapes_settings(self.conf, source)  # checked once, passed on
        self.samples = synthetic_shapes.split_samples(self.shapes, self.split)  # [(primitive, index)]
        self.entries = None  # [(image path, points)] in the same order, when read from the cache
        if not self.conf["on_the_fly"]:
            root = Path(data_path if data_path is not None else settings.DATA_PATH)  # read at call time
            cache = synthetic_shapes_cache.ensure_cache(root, self.shapes, self.conf["workers"], (self.split,))
            self.entries = synthetic_shapes_cache.load_split(cache, self.shapes, self.split)
        self.seeds = AugmentationSeeds(self.seed, task, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def shape_sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented sample: image (H, W) float32 in [0, 1] and keypoints (N, 2) x, y."""
        if self.entries is None:
            primitive, i = self.samples[index]
            image, points = synthetic_shapes.render_sample(self.shapes, primitive, self.split, i)
        else:
            path, points = self.entries[index]
            image = read_image(path)
        return image.astype(np.float32) / 255.0, np.asarray(points, np.float32).reshape(-1, 2)

    def set_epoch(self, epoch: int) -> None:
        """Seed training augmentations by (seed, index, epoch) from now on (see the module docstring)."""
        self.seeds.set_epoch(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of one access to sample `index` (see the module docstring)."""
        return self.seeds.rng(index)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # negative indices; IndexError beyond the end
        image, points = self.shape_sample(index)
        sample = self.build(image, torch.from_numpy(points), self.rng(index))
        primitive, i = self.samples[index]
        sample["name"] = f"{primitive}_{i}"
        return sample
