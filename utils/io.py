"""File I/O that never leaves a half-written file: write to a temporary file beside the target, then
rename (atomic on POSIX). Readers raise errors that name the file."""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np


class DataError(RuntimeError):
    """An input file is missing, unreadable or corrupt."""


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporary files an interrupted `atomic_path(path)` left beside `path` (killed
    processes cannot clean up). Only names of exactly that form are removed: `.<name>.<8 chars><suffix>`."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}(\.[^/]*)?")
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
            if pattern.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to `path` when the block succeeds.

    The file gets the permissions a plain `open` would give it (0666 minus the umask; mkstemp alone
    makes 0600), and temporaries of earlier interrupted writes of `path` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        remove_stale_temporaries(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path: str | Path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    with atomic_path(path, ".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_npz(path: str | Path, keys=None) -> dict:
    """Load every array (or `keys`) of an npz into memory; a corrupt or incomplete file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = data.files if keys is None else keys
            missing = [k for k in wanted if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing keys {missing}; it has {sorted(data.files)}")
            return {k: data[k] for k in wanted}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or unreadable npz ({type(e).__name__}: {e})") from e


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path):
    """The JSON value in a file, or None when there is no file; an unreadable one is a DataError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, obj) -> None:
    """Append one JSON object as a line (a single write, so lines are never interleaved)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def save_image(path: str | Path, image: np.ndarray) -> None:
    """Write an image (uint8 grey, or BGR) with OpenCV, atomically. Format from the suffix."""
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix, image)
    except cv2.error:  # OpenCV raises for a suffix it has no encoder for
        ok = False
    if not ok:
        raise DataError(f"{path}: could not write an image of shape {image.shape} as '{path.suffix}' "
                        f"(use .png or .jpg)")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())

