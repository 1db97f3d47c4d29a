"""Shared timing helpers for the benchmark scripts (median of repeated runs after warm-up)."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def seconds_per_call(fn: Callable[[], object], device: torch.device, steps: int, runs: int) -> float:
    """Median over `runs` of the mean time in seconds of `steps` calls of `fn()`, after one warm-up call
    (for calls too slow to repeat 20 times, e.g. training steps)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_json(path: str | None, rows: Sequence[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps(list(rows), indent=2) + "\n")
        print(f"wrote {path}")


def devices(requested: str) -> list[torch.device]:
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(requested)]
