"""Processes, devices and sharding: the one place that reads torchrun's environment.

`distributed_context()` says which process this is (RANK / WORLD_SIZE / LOCAL_RANK, set by torchrun;
a single process without them), `default_device` picks the device every command runs on (the local
rank's GPU when CUDA is present, else the CPU), `derived_seed` mixes several integers into one seed, and
`ResumableSampler` gives a rank its share of an epoch from any position on, so a resumed training run
sees the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun; a single process without them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    return DistributedContext(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))


def default_device(ctx: Optional[DistributedContext] = None) -> torch.device:
    """This process's device: its local rank's GPU (modulo the GPUs present) with CUDA, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    ctx = ctx if ctx is not None else distributed_context()
    return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())


def init_process_group(ctx: DistributedContext, backend: Optional[str] = None) -> None:
    """Join the process group of a torchrun (NCCL on GPUs, gloo on the CPU); a no-op for one process."""
    if ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (seed, epoch, rank...), well mixed."""
    return int(np.random.SeedSequence([int(p) % 2 ** 63 for p in parts]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """This rank's share of epoch e (`DistributedSampler` order for `seed` and e), from position `start`
    of the share on: `set_position(epoch, start)` resumes in the middle of an epoch."""

    def __init__(self, dataset, ctx: DistributedContext, shuffle: bool, seed: int):
        self.base = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                       seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.base), self.start, None)

    def __len__(self) -> int:
        return len(self.base) - self.start
