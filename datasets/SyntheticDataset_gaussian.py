"""Synthetic Shapes for MagicPoint (reference-spec 3.4): rendered shapes with exact corner labels,
augmented photometrically then homographically (`datasets.data_tools.TrainingSample`).

The shapes come from `datasets.synthetic_shapes`, either from its disk cache under
`DATA_PATH/synthetic_shapes_<suffix>/` (generated on first use, rebuilt or refused when the generation
parameters change) or, with `on_the_fly: true`, rendered in the DataLoader workers with no cache; both
give the same images for the same configuration.

Randomness. A training sample's augmentation is drawn from
`np.random.default_rng([seed, index, draw, worker_seed])`: `draw` counts how often this dataset object
has produced sample `index` in this process, and `worker_seed` is torch's seed of the current
DataLoader worker (`get_worker_info().seed`, drawn anew for each epoch's workers from the seeded
torch generator; 0 outside workers). So a seeded run is reproducible, while every epoch, worker and
repeated access sees a new augmentation. Validation samples depend on (seed, index) only, so every
validation sees the same set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

import settings
from datasets import synthetic_shapes
from datasets.data_tools import TrainingSample, training_defaults
from utils.config import IGNORED, OPEN, combine, merge

default_conf = combine(training_defaults, {
    "dataset": "SyntheticDataset_gaussian",
    "primitives": "all",  # `all` or a list of synthetic_shapes.PRIMITIVES
    "truncate": OPEN,  # {primitive: fraction of its images kept}
    "suffix": None,  # cache folder DATA_PATH/synthetic_shapes_<suffix>
    "generation": synthetic_shapes.generation_defaults,
    "preprocessing": {"resize": [240, 320], "blur_size": 11},
    "on_the_fly": False,  # render in the DataLoader workers instead of reading the cache
    "workers": 2,  # processes generating the cache
    # TF-era keys of the reference's configs, accepted and unused.
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

    conf: the `data` section (reference-spec 2.1), merged over `default_conf`; unknown keys are
    ConfigErrors naming them. task: 'train' (split `training`) or 'val' (split `validation`).
    seed: seeds the augmentation (see the module docstring). data_path: where the cache lives.
    Samples hold the keys of `datasets.data_tools.TrainingSample` and `name`.
    """

    default_conf = default_conf

    def __init__(self, conf: Mapping | None = None, task: str = "train", seed: int = 0,
                 data_path: str | Path = settings.DATA_PATH, source: str = "data"):
        if task not in TASK_SPLITS:
            raise ValueError(f"task is {task!r}; expected one of {list(TASK_SPLITS)}")
        self.conf = merge(type(self).default_conf, conf, source=source)
        self.task, self.split, self.seed = task, TASK_SPLITS[task], int(seed)
        self.build = TrainingSample(self.conf, task, source)
        if self.conf["on_the_fly"]:
            self.cache_dir = None
            self.length = synthetic_shapes.split_length(self.conf, self.split)
        else:
            self.cache_dir = synthetic_shapes.ensure_cache(Path(data_path), self.conf, self.conf["workers"])
            self.entries = synthetic_shapes.load_split(self.cache_dir, self.split, self.conf["truncate"] or {})
            self.length = len(self.entries)
        self.draws = np.zeros(self.length, np.int64)

    def __len__(self) -> int:
        return self.length

    def shape_sample(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The un-augmented image (H, W) float32 in [0, 1], its keypoints (N, 2) x, y and a name."""
        if self.cache_dir is None:
            image, points = synthetic_shapes.render_sample(self.conf, self.split, index, self.conf["generation"]["random_seed"])
            name = f"{self.split}_{index}"
        else:
            path, points = self.entries[index]
            image = synthetic_shapes.read_image(path)
            name = Path(path).stem
        return np.asarray(image, np.float32) / 255.0, np.asarray(points, np.float32).reshape(-1, 2), name

    def rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of one access to sample `index` (see the module docstring)."""
        if self.task == "val":
            return np.random.default_rng([self.seed, index])
        worker = torch.utils.data.get_worker_info()
        draw = int(self.draws[index])
        self.draws[index] += 1
        return np.random.default_rng([self.seed, index, draw, worker.seed if worker else 0])

    def __getitem__(self, index: int) -> dict:
        image, points, name = self.shape_sample(index)
        sample = self.build(image, torch.from_numpy(points), self.rng(index))
        sample["name"] = name
        return sample
