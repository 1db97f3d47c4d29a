"""What made an output folder, and whether a new command may write into it.

Every command that writes under EXPER_PATH (training, the exports) records in its output folder a
`run.json`: the task, the resolved configuration, the SHA-256 of the weights it started from, the
command line and the code version. Before writing, `plan_run` compares that record with the new
command's and decides:

* an empty folder (or one without outputs)            -> "new";
* `--overwrite`                                       -> "overwrite": the old outputs are removed first,
                                                         so nothing of the old run is mixed in;
* `--resume` with a matching record                   -> "resume"; only the keys a task lists as
                                                         `may_change` (an iteration budget, a learning
                                                         rate, intervals, workers...) may differ;
* no flag, the same record, and a task whose outputs
  are a pure function of the record (`implicit_resume`) -> "resume" (rerunning an export completes it);
* anything else                                       -> RunConflict, a one-line error that lists the
                                                         differing dotted keys and names both flags.

Nothing is written by `plan_run`; `RunPlan.apply()` removes stale outputs and writes the record once
the caller's settings have been checked, so a command that fails its checks leaves the folder as it was.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from utils.config import ConfigError, check_number, to_plain
from utils.io import DataError, read_json, write_json, write_text

log = logging.getLogger(__name__)

RECORD_NAME = "run.json"
VERSION = "0.1.0"  # the code version outside a git checkout
REPO = Path(__file__).resolve().parents[1]
MAX_LISTED = 8  # differing keys named in a refusal


class RunConflict(ConfigError):
    """A command would write into a folder holding the outputs of another run."""


def code_version() -> str:
    """`git describe --always --dirty` of the checkout this code runs from, else VERSION."""
    if (REPO / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--tags"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return f"git {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return VERSION


def file_sha256(path: str | Path | None) -> Optional[str]:
    """Hex SHA-256 of a file (None for no path or a missing file)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The command line being run: set by utils.cli.exit_on_error (a script's main called with an argv list
# in-process has another sys.argv); sys.argv otherwise.
command_line: Optional[list] = None


def make_record(task: str, conf: Mapping, weights: str | Path | None = None,
                argv: Sequence[str] | None = None) -> dict:
    """The record of a run: task, resolved config, weights (path and SHA-256), command, version."""
    argv = list(argv if argv is not None else command_line or sys.argv)
    return {"task": task, "config": to_plain(conf),
            "weights": {"path": str(weights) if weights else None, "sha256": file_sha256(weights)},
            "command": " ".join(shlex.quote(a) for a in argv), "version": code_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def flatten(obj: Any, prefix: str = "") -> dict:
    """{'a.b.c': leaf} of a nested mapping (lists are leaves)."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict = {}
    for key, value in obj.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, dotted) if isinstance(value, Mapping) and value else {dotted: value})
    return out


def differences(old: Mapping, new: Mapping, may_change: Iterable[str] = ()) -> list:
    """Dotted keys of the task, config and weights hash that differ, except those under `may_change`.

    Returns [(key, old value, new value)] sorted by key; config keys are given without 'config.'.
    """
    def compared(record: Mapping) -> dict:
        flat = {f"config.{k}": v for k, v in flatten(record.get("config") or {}).items()}
        flat["task"] = record.get("task")
        flat["weights.sha256"] = (record.get("weights") or {}).get("sha256")
        return flat

    allowed = tuple(may_change)
    a, b = compared(old), compared(new)
    out = []
    for key in sorted(set(a) | set(b)):
        short = key[len("config."):] if key.startswith("config.") else key
        if any(short == m or short.startswith(m + ".") for m in allowed):
            continue
        if a.get(key) != b.get(key):
            out.append((short, a.get(key), b.get(key)))
    return out


def describe_differences(diffs: list) -> str:
    shown = [f"{key} ({old!r} -> {new!r})" for key, old, new in diffs[:MAX_LISTED]]
    more = f" and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
    return ", ".join(shown) + more


def read_record(folder: str | Path) -> Optional[dict]:
    try:
        return read_json(Path(folder) / RECORD_NAME)
    except DataError as e:
        log.warning("%s; treating the folder as unrecorded", e)
        return None


@dataclass
class RunPlan:
    """The decision of `plan_run`; `apply()` carries it out."""
    folder: Path
    mode: str  # new | resume | overwrite
    record: dict
    outputs: tuple = ()
    previous: Optional[dict] = None
    changed: list = field(default_factory=list)

    def apply(self) -> None:
        """Remove the outputs of the old run (overwrite) and write the record (before any output)."""
        if self.mode == "overwrite":
            removed = remove_outputs(self.folder, self.outputs)
            log.info("--overwrite: removed %d old output(s) from %s", removed, self.folder)
        record = self.record
        if self.mode == "resume" and self.previous is not None:
            # The original record stays; each resume is appended with what changed.
            resumes = list(self.previous.get("resumes", []))
            resumes.append({"command": record["command"], "version": record["version"], "at": record["created"],
                            "changed": {k: new for k, _, new in self.changed}})
            record = {**self.previous, "resumes": resumes}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / RECORD_NAME, record)
        self.record = record

    def update(self, **fields) -> None:
        """Add fields (e.g. bad-item counts) to the written record."""
        self.record = {**self.record, **to_plain(fields)}
        write_json(self.folder / RECORD_NAME, self.record)


def existing_outputs(folder: Path, outputs: Iterable[str]) -> list:
    found = []
    for pattern in outputs:
        found.extend(folder.glob(pattern))
    return found


def remove_outputs(folder: Path, outputs: Iterable[str]) -> int:
    """Delete what the patterns match under `folder` (files and folders) and the record."""
    paths = existing_outputs(folder, outputs) + [folder / RECORD_NAME]
    removed = 0
    for path in sorted(set(paths), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed += 1
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed += 1
    return removed


def drop_rows_after(path: Path, n_iter: int) -> None:
    """Remove the rows of a metrics.jsonl whose iteration is after `n_iter` (and a line cut short): a run
    killed after validating but before its next checkpoint resumes before them and writes them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _row_iteration(line) <= n_iter]
    if len(kept) != len(lines):
        log.info("%s: dropped %d row(s) after iteration %d (the resumed run repeats them)", path,
                 len(lines) - len(kept), n_iter)
        write_text(path, "".join(line + "\n" for line in kept))


def _row_iteration(line: str) -> float:
    try:
        return float(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plan_run(folder: str | Path, record: Mapping, outputs: Sequence[str], resume: bool = False,
             overwrite: bool = False, may_change: Iterable[str] = (), implicit_resume: bool = False) -> RunPlan:
    """Decide how a command writes into `folder` (see the module docstring). Writes nothing.

    outputs: glob patterns (relative to folder) of what the command writes; they tell a used folder
    from an empty one and are what --overwrite removes.
    """
    folder = Path(folder)
    if resume and overwrite:
        raise ConfigError("command line: --resume and --overwrite exclude each other; choose one")
    for path in (folder, *folder.parents):  # an existing file where a folder is needed (EXPER_PATH, ...)
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
            break
    previous = read_record(folder) if folder.is_dir() else None
    used = folder.is_dir() and bool(existing_outputs(folder, outputs))
    plan = RunPlan(folder, "new", dict(record), tuple(outputs), previous)
    if not used:
        return plan
    if overwrite:
        plan.mode = "overwrite"
        return plan
    if previous is None:
        if resume:
            log.warning("%s has no %s (made by an older version?); resuming without checking its configuration",
                        folder, RECORD_NAME)
            plan.mode = "resume"
            return plan
        raise RunConflict(f"{folder} holds outputs of an unrecorded run (no {RECORD_NAME}); rerun with --resume "
                          f"to continue it or --overwrite to replace it")
    every = differences(previous, record)
    if resume:
        blocking = differences(previous, record, may_change)
        if blocking:
            raise RunConflict(f"{folder}: --resume refused: the configuration differs from the recorded run's "
                              f"in {describe_differences(blocking)}; use the recorded values or --overwrite "
                              f"(or another experiment name)")
        plan.mode, plan.changed = "resume", every
        return plan
    if implicit_resume and not every:
        log.info("%s holds a run of the same configuration; completing it", folder)
        plan.mode = "resume"
        return plan
    what = (f"a run with another configuration (differing: {describe_differences(every)})" if every
            else "a run of this configuration")
    raise RunConflict(f"{folder} holds the outputs of {what}; rerun with --resume to continue it, --overwrite to "
                      f"replace it, or choose another experiment name")


# --------------------------------------------------------------------------------------------------
# Bad input items
# --------------------------------------------------------------------------------------------------

DEFAULT_MAX_BAD_FRACTION = 0.1


class TooManyBadItems(RuntimeError):
    """More input items were unreadable than the allowed fraction of all items."""


class BadItems:
    """Counts the input items a run skips (corrupt, truncated, too small, unreadable).

    Each is logged with its name and error; past `max_fraction` of the `total` items (distinct names;
    one alone is always tolerated unless the fraction is 0) `add` raises TooManyBadItems, so a broken
    dataset stops the run instead of training or exporting on
    what is left of it. The counts go into the run's record (`as_record`).
    """

    def __init__(self, total: int, max_fraction: float = DEFAULT_MAX_BAD_FRACTION, what: str = "items"):
        self.total, self.max_fraction, self.what = int(total), float(max_fraction), what
        self.items: dict = {}

    def add(self, name: str, error: str) -> None:
        if name not in self.items:
            log.error("skipped %s: %s", name, error)
        self.items[str(name)] = str(error)
        # A single bad item never stops a run (unless the fraction is 0): small sets keep going too.
        if len(self.items) > self.max_fraction * self.total and (len(self.items) > 1 or self.max_fraction == 0):
            raise TooManyBadItems(
                f"{len(self.items)} of {self.total} {self.what} are unreadable (more than the allowed fraction "
                f"{self.max_fraction:g}), e.g. {name}: {error}; fix or remove them, or raise the fraction")

    def __len__(self) -> int:
        return len(self.items)

    def as_record(self) -> dict:
        return {"count": len(self.items), "of": self.total, "max_fraction": self.max_fraction, "items": self.items}


def add_arguments(parser, bad_fraction: bool = True,
                  resume_help: str = "continue the run recorded in the output folder (only with its configuration)"
                  ) -> None:
    """--resume, --overwrite (and --max-bad-fraction) of every command that writes under EXPER_PATH."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the output folder's earlier outputs, then start afresh")
    if bad_fraction:
        parser.add_argument("--max-bad-fraction", type=_fraction_argument, default=DEFAULT_MAX_BAD_FRACTION,
                            metavar="F",
                            help="stop when more than this fraction of the input items is unreadable "
                                 f"(default {DEFAULT_MAX_BAD_FRACTION})")


def _fraction_argument(value: str) -> float:
    """--max-bad-fraction: a number in [0, 1], checked by the shared helper and blamed on the command line."""
    try:
        return check_number(value, "--max-bad-fraction", "command line", 0, 1, example=0.1)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
