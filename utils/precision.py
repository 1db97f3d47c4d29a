"""The one place that turns `precision: fp32 | bf16 | fp16 | auto` into autocast settings, a memory
layout and (fp16) a gradient scaler, for training and inference alike.

Only the network runs in reduced precision; callers convert its outputs to fp32 before softmax, NMS,
sub-pixel refinement, descriptor normalisation and losses.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


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
