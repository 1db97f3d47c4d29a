"""Shared timing helpers for the benchmark scripts (median of repeated runs after warm-up)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
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


def cpu_description() -> str:
    """The CPU's model and vector/matrix capability (AVX2, AVX512, AVX512-BF16, AMX), for table headers:
    bf16 speed depends on them, and the same benchmark reads differently on another CPU kind."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX512"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_bf16", "AMX-BF16")) if flag in flags]
    return (f"{model}; {', '.join(units) or 'no AVX2'}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} cores")


def machine_load() -> str:
    """The 1-minute load average and core count: benchmarks on a shared machine must say how busy it was."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


class CompetingProcesses:
    """`n` single-threaded busy processes (matrix products) while the block runs: the speed of a
    setting on a machine where something else computes too."""

    def __init__(self, n: int):
        self.n, self.processes = n, []

    def __enter__(self):
        code = "import numpy as np\nx = np.random.rand(256, 256)\nwhile True:\n    x = x @ x\n    x /= np.abs(x).max()\n"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.processes = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.wait()
