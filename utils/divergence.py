"""Divergence of a training run: `DivergenceMonitor` watches the loss of every iteration and says when
the run has diverged; `TrainingDiverged` is the error that stops it (train4.py exits 3 on it)."""
from __future__ import annotations

import statistics
from collections import deque
from pathlib import Path
from typing import Mapping, Optional

from utils.checkpoints import checkpoints_by_iteration, latest_checkpoint


class TrainingDiverged(RuntimeError):
    """The loss diverged (see DivergenceMonitor); the message says where to resume from."""


HISTORY_SHOWN = 12  # (iteration, loss) pairs quoted when a run diverges


class DivergenceMonitor:
    """Watches the loss of every iteration for divergence.

    A step is bad when its loss or its gradients are not finite, or when its loss exceeds `factor` x the
    median of the last `window` good losses (from the second iteration on: a learning rate far too high
    spoils the very first steps, and a median over them would hide it). A run of consecutive bad
    steps is a divergence after `patience` of them, or `nan_patience` when all were non-finite (a
    non-finite step is skipped without harm, e.g. one bad batch, so more are tolerated). `onset` is the
    first bad iteration: its loss came from the weights after iteration onset - 1, so those weights and
    all later ones are suspect. `good` is saved in checkpoints, so a resumed run keeps watching.
    """

    def __init__(self, conf: Mapping, nan_patience: int, history=()):
        self.factor, self.patience = conf["factor"], conf["patience"]
        self.nan_patience = nan_patience
        self.good = deque((float(x) for x in history), maxlen=conf["window"])
        self.recent: deque = deque(maxlen=HISTORY_SHOWN)
        self.onset, self.bad, self.exploded = None, 0, False

    def update(self, n_iter: int, loss: float, finite: bool) -> bool:
        """Record iteration `n_iter` (its loss, whether loss and gradients were finite); True: diverged."""
        self.recent.append((n_iter, loss))
        exploded = finite and bool(self.good) and loss > self.factor * statistics.median(self.good)
        if finite and not exploded:
            self.good.append(loss)
            self.onset, self.bad, self.exploded = None, 0, False
            return False
        self.onset = n_iter if self.bad == 0 else self.onset
        self.bad += 1
        self.exploded |= exploded
        return self.bad >= (self.patience if self.exploded else self.nan_patience)

    def describe(self) -> str:
        kind = (f"more than {self.factor:g} x its running median {statistics.median(self.good):.4g}" if self.exploded
                else "NaN/inf (loss or gradients)")
        history = ", ".join(f"{i}: {loss:.4g}" for i, loss in self.recent)
        return (f"the loss was {kind} for {self.bad} consecutive iterations from iteration {self.onset} on "
                f"(iteration: loss {history})")

    def stop(self, n_iter: int, checkpoint_dir: Optional[Path]) -> TrainingDiverged:
        """The error that stops the run at iteration `n_iter`. The checkpoints in `checkpoint_dir` saved
        since the divergence began are set aside (`*.diverged`), so that the last one before it is what
        --resume continues from (None: leave them, e.g. on a rank that does not write checkpoints)."""
        kept = None
        if checkpoint_dir is not None:
            for n, path in checkpoints_by_iteration(checkpoint_dir):
                if n >= self.onset - 1:
                    path.rename(path.with_name(path.name + ".diverged"))
            kept = latest_checkpoint(checkpoint_dir)
        advice = (f"the last checkpoint before it, {kept}, is the one --resume continues from: lower "
                  f"model.learning_rate (or fix the data) and rerun the command with --resume" if kept else
                  "no checkpoint was saved before it: lower model.learning_rate (or fix the data) and start "
                  "again with --overwrite")
        return TrainingDiverged(f"training diverged at iteration {n_iter}: {self.describe()}; {advice}")
