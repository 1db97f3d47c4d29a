"""The data of a training run: the datasets named by `data.dataset`, the resumable training sampler and
the loaders, and the stream of training batches from any iteration on.

Resuming at iteration n goes on with the batches an uninterrupted run would have seen: epoch e visits
the dataset in the order of `DistributedSampler(seed, epoch=e)`, DataLoader workers are seeded from
(seed, epoch, rank), and a dataset with a `set_epoch(epoch)` method is told the epoch (whether its
augmentations then repeat exactly is up to its seeding; SyntheticDataset_gaussian's do). Under torchrun
each rank gets its share of every epoch, `model.batch_size / WORLD_SIZE` samples per step, so the global
batch is the configured one. Unreadable items are left out of their batch and reported in the batch's
`bad_items` (datasets.data_tools.collate_skipping_bad), never fatal alone.
"""
from __future__ import annotations

import inspect
import random
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from datasets import get_dataset_class
from datasets.data_tools import SkipBadItems, collate_skipping_bad
from utils.config import ConfigError
from utils.distributed import DistributedContext, ResumableSampler, derived_seed


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class TrainingData:
    """conf: the checked training config; datasets: optional (train, val) datasets instead of building them
    from `data.dataset` (val is built only when `validate`, on rank 0); `pin`: pin memory (CUDA)."""

    def __init__(self, conf: Mapping, ctx: DistributedContext, seed: int, validate: bool, pin: bool = False,
                 datasets=None, source: str = "config"):
        self.conf, self.ctx, self.seed, self.source = conf, ctx, seed, source
        mconf, tconf = conf["model"], conf["training"]
        self.per_rank_batch = self._per_rank_batch(mconf["batch_size"])
        self.train_set, self.val_set = datasets if datasets is not None else self._build_datasets(validate)
        data_conf = getattr(self.train_set, "conf", conf["data"]) or {}
        self.gaussian = bool((data_conf.get("gaussian_label") or {}).get("enable"))
        self.sampler = ResumableSampler(self.train_set, ctx, shuffle=True, seed=seed)
        self.steps_per_epoch = len(self.sampler) // self.per_rank_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{source}: the training set has {len(self.train_set)} samples, fewer than "
                              f"one batch of model.batch_size {mconf['batch_size']}")
        self.generator = torch.Generator()
        self.train_loader = DataLoader(SkipBadItems(self.train_set), batch_size=self.per_rank_batch,
                                       sampler=self.sampler, num_workers=tconf["workers_train"], drop_last=True,
                                       pin_memory=pin, generator=self.generator, collate_fn=collate_skipping_bad)
        self.val_loader = None
        if validate and ctx.is_main:
            workers = tconf["workers_val"]
            self.val_loader = DataLoader(SkipBadItems(self.val_set), batch_size=mconf["eval_batch_size"],
                                         shuffle=False, num_workers=workers, pin_memory=pin,
                                         persistent_workers=workers > 0, collate_fn=collate_skipping_bad)

    def _per_rank_batch(self, batch_size: int) -> int:
        if batch_size % self.ctx.world_size:
            raise ConfigError(f"{self.source}: model.batch_size {batch_size} is not divisible by the "
                              f"{self.ctx.world_size} processes (WORLD_SIZE)")
        return batch_size // self.ctx.world_size

    def _build_datasets(self, validate: bool):
        cls = get_dataset_class(self.conf["data"]["dataset"])
        # Rank 0 first, so that a dataset that builds a disk cache does it once.
        if self.ctx.enabled and not self.ctx.is_main:
            dist.barrier()
        # Errors in the data section name the config file (datasets that take a `source`).
        named = {"source": f"{self.source}, data"} if "source" in inspect.signature(cls).parameters else {}
        train = cls(self.conf["data"], task="train", seed=self.seed, **named)
        val = cls(self.conf["data"], task="val", seed=self.seed, **named) if validate and self.ctx.is_main else None
        if self.ctx.enabled and self.ctx.is_main:
            dist.barrier()
        return train, val

    def batches(self, n_iter: int) -> Iterator[Mapping]:
        """Training batches from iteration `n_iter` on, epoch after epoch."""
        epoch, offset = divmod(n_iter, self.steps_per_epoch)
        while True:
            self.sampler.set_position(epoch, offset * self.per_rank_batch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            epoch_seed = derived_seed(self.seed, epoch, self.ctx.rank)
            self.generator.manual_seed(epoch_seed)  # DataLoader worker seeds
            seed_everything(epoch_seed)  # data loading in this process (workers_train: 0)
            yield from self.train_loader
            epoch, offset = epoch + 1, 0


def network_input(batch: Mapping) -> torch.Tensor:
    """The images of a batch as one network input: `image`, then `warped_img` when the samples have one."""
    if "warped_img" in batch:
        return torch.cat([batch["image"], batch["warped_img"]])
    return batch["image"]
