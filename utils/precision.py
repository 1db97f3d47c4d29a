"""The one place that turns `precision: fp32 | bf16 | fp16 | auto` into autocast settings, a memory
layout and (fp16) a gradient scaler, for training and inference alike; and `threads: N | auto` into
the number of CPU threads the run computes with.

Only the network runs in reduced precision; callers convert its outputs to fp32 before softmax, NMS,
sub-pixel refinement, descriptor normalisation and losses.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 matrix units that make autocast pay)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(precision: str, device: torch.device | str) -> str:
    """The concrete precision ('fp32', 'bf16' or 'fp16') that `precision` means on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision is {precision!r}; expected one of {list(PRECISIONS)}")
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'auto' on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str):
    """Context manager running the enclosed network calls at `precision` (fp32: no autocast)."""
    device = torch.device(device)
    concrete = resolve(precision, device)
    if concrete == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if concrete == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(precision: str, device: torch.device | str) -> bool:
    """channels-last memory layout pays for convolutions on the CPU and under reduced precision."""
    device = torch.device(device)
    return device.type == "cpu" or resolve(precision, device) != "fp32"


def grad_scaler(precision: str, device: torch.device | str):
    """A GradScaler for fp16 training, else a disabled one (same interface)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=resolve(precision, device) == "fp16")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores kept busy by other processes: the 1-minute load average, rounded down (0 where unknown).
    Read before this run starts computing, it is the load of the others."""
    try:
        return int(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def auto_threads(workers: int = 0) -> int:
    """Threads per process that do not oversubscribe the machine: the usable cores, minus those busy
    with other processes, minus `workers` helper processes of this run (DataLoader workers, rendering
    processes), shared among the processes of a torchrun on this machine (LOCAL_WORLD_SIZE); at least 1.
    On a shared CPU one thread more than there are free cores makes every parallel op wait for a
    descheduled thread: such runs were measured several times slower than on one thread (README)."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (usable_cores() - busy_cores() - max(0, int(workers))) // processes)


def check_threads(threads, key: str = "threads") -> int | str:
    """`threads` if it is a positive integer or 'auto', else a ValueError naming `key`."""
    if threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return threads
    raise ValueError(f"{key} is {threads!r}; expected a positive integer or 'auto'")


def set_threads(threads: int | str = "auto", workers: int = 0, key: str = "threads") -> int:
    """Set torch's intra-op threads (what the CPU backends use too) to `threads` ('auto': `auto_threads`
    with `workers` helper processes) and return the number."""
    n = auto_threads(workers) if check_threads(threads, key) == "auto" else threads
    torch.set_num_threads(n)
    log.info("%s: %d CPU thread(s) (%s; %d usable cores, %d busy with other processes, %d worker process(es))",
             key, n, threads, usable_cores(), busy_cores(), workers)
    return n
