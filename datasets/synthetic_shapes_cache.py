"""The disk cache of synthetic shapes: `ensure_cache` renders what is missing with a pool of worker
processes, `load_split` lists a split's image files and points. Drawing is datasets/synthetic_shapes.py.

ensure_cache(data_path, settings, workers=None, splits=("training", "validation")) -> Path
    generates what is missing of `<data_path>/synthetic_shapes_<suffix>/` (worker processes, tqdm) and
    returns that folder
load_split(cache_dir, settings, split) -> [(image_path, points), ...] in `split_samples` order
`settings`: a `synthetic_shapes.ShapesSettings` (a raw data section is checked first); the workers get
the settings object itself.

Only the images that `truncate` keeps and only the requested splits are generated (images depend on
their index only, so a larger set later reuses them).

Cache layout: `<cache>/manifest.json` (the generation parameters and GENERATOR_VERSION; a cache made
with other ones is deleted and regenerated, with a warning), `<cache>/<primitive>/images/<split>/<i>.png`
and `<cache>/<primitive>/points/<split>/<start>-<stop>.npz` (keys `points` (M, 2) float32 and `counts`
(stop - start,) int32: the points of images start..stop-1, concatenated). Images are generated in chunks
of CHUNK_SIZE; a chunk's points file is written atomically after its images and commits the chunk, so
an interrupted generation resumes with the uncommitted chunks.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import shutil
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from datasets.synthetic_shapes import GENERATOR_VERSION, PRIMITIVES, SPLITS, ShapesSettings, render_sample, \
    shapes_settings, split_samples
from utils import precision
from utils.io import DataError, load_npz, read_json, save_npz, write_json
from utils.runs import flatten

log = logging.getLogger(__name__)

CHUNK_SIZE = 100  # images per points file and per generation task


def cache_dir(data_path, settings) -> Path:
    """`<data_path>/synthetic_shapes_<suffix>` (no suffix: `synthetic_shapes`)."""
    suffix = shapes_settings(settings).suffix
    return Path(data_path) / ("synthetic_shapes" + (f"_{suffix}" if suffix is not None else ""))


def _identity(s: ShapesSettings) -> dict:
    """What the images depend on (split sizes and truncate only decide how many there are)."""
    plain = s.as_dict()
    identity = {"generator_version": GENERATOR_VERSION,
                **{k: plain[k] for k in ("image_size", "resize", "blur_size", "random_seed", "oversampling", "params")}}
    return json.loads(json.dumps(identity))  # tuples -> lists, as read back from the file


def _chunk_files(folder: Path) -> dict:
    """{start: (stop, path)} of the points files in a split folder (the largest stop per start)."""
    chunks = {}
    for path in folder.glob("*.npz") if folder.is_dir() else []:
        try:
            start, stop = (int(v) for v in path.stem.split("-"))
        except ValueError:
            continue
        if start not in chunks or stop > chunks[start][0]:
            chunks[start] = (stop, path)
    return chunks


def _chunk_starts(count: int) -> range:
    return range(0, count, CHUNK_SIZE)


def _missing_chunks(cache: Path, s: ShapesSettings, splits) -> list:
    tasks = []
    for p in s.primitives:
        for split in splits:
            count = s.split_count(p, split)
            have = _chunk_files(cache / p / "points" / split)
            for start in _chunk_starts(count):
                stop = min(start + CHUNK_SIZE, count)
                if have.get(start, (-1,))[0] < stop:
                    tasks.append((p, split, start, stop))
    return tasks


def _generate_chunk(cache: Path, settings: ShapesSettings, primitive: str, split: str, start: int, stop: int) -> int:
    """Render images start..stop-1 of one primitive/split into the cache.

    The chunk is the unit of atomicity: its points file, written atomically after its images, commits
    it; a chunk interrupted before that is regenerated whole, and readers only use committed chunks.
    So the images are written plainly (a temporary file and rename per image cost ~1 ms here)."""
    images = cache / primitive / "images" / split
    images.mkdir(parents=True, exist_ok=True)
    points = []
    for i in range(start, stop):
        image, pts = render_sample(settings, primitive, split, i)
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise DataError(f"{images / f'{i}.png'}: could not encode the image")
        (images / f"{i}.png").write_bytes(png.tobytes())
        points.append(pts)
    folder = cache / primitive / "points" / split
    save_npz(folder / f"{start:06d}-{stop:06d}.npz", points=np.concatenate(points).reshape(-1, 2),
             counts=np.array([len(p) for p in points], dtype=np.int32))
    for old in folder.glob(f"{start:06d}-*.npz"):  # shorter chunks now superseded
        if old.stem != f"{start:06d}-{stop:06d}":
            old.unlink(missing_ok=True)
    return stop - start


def _generate_task(args) -> int:
    return _generate_chunk(*args)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock (several processes, e.g. DDP ranks, may ask for the same cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(cache: Path):
    """The manifest, None without one, {} when it is unreadable (the cache is then regenerated)."""
    try:
        return read_json(cache / "manifest.json")
    except DataError as e:
        log.warning("synthetic shapes: %s; the cache will be regenerated", e)
        return {}


def _differences(old, new) -> list:
    """'key: old -> new' of the dotted keys whose values differ."""
    a, b = flatten(old or {}), flatten(new or {})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def ensure_cache(data_path, settings, workers: int | None = None, splits=("training", "validation")) -> Path:
    """Make `<data_path>/synthetic_shapes_<suffix>/` hold every image of `splits` that the settings'
    primitives, split sizes and truncate ask for, and return that folder.

    Images already there are reused when the manifest's generation parameters equal the settings'; a
    cache made with other parameters (or by other code) is deleted and regenerated, with a warning.
    workers: processes (default: the usable CPU cores not busy with other processes,
    utils.precision.auto_threads); the images do not depend on it.
    """
    s = shapes_settings(settings)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    cache = cache_dir(data_path, s)
    identity = _identity(s)
    with _locked(cache / ".lock"):
        manifest = _read_manifest(cache)
        ours = [cache / p for p in PRIMITIVES if (cache / p).exists()]
        if manifest is not None and manifest.get("identity") != identity:
            changes = _differences(manifest.get("identity"), identity)
            log.warning("synthetic shapes: %s was generated with other parameters (%s); deleting and "
                        "regenerating it", cache, "; ".join(changes) or "unreadable manifest")
        elif manifest is None and ours:
            log.warning("synthetic shapes: %s holds shapes without a manifest; deleting and regenerating them",
                        cache)
        else:
            ours = []
        for folder in ours:
            shutil.rmtree(folder)
        write_json(cache / "manifest.json", {
            "identity": identity,
            # Informational: the request that last extended the cache (images depend on their index only).
            "primitives": list(s.primitives), "split_sizes": dict(s.split_sizes), "truncate": dict(s.truncate)})
        tasks = _missing_chunks(cache, s, splits)
        if tasks:
            _run(tasks, cache, s, workers)
    return cache


def _run(tasks: list, cache: Path, settings: ShapesSettings, workers: int | None) -> None:
    workers = workers or precision.auto_threads()
    total = sum(stop - start for _, _, start, stop in tasks)
    log.info("synthetic shapes: generating %d images into %s with %d process(es)", total, cache, workers)
    jobs = [(cache, settings, *task) for task in tasks]
    with tqdm(total=total, desc="synthetic shapes", unit="img") as bar:
        if workers == 1:
            for job in jobs:
                bar.update(_generate_task(job))
            return
        # Forked workers, one OpenCV thread each. A forked process must not reconfigure OpenCV's
        # thread pool (cv2.setNumThreads deadlocks there), so this process sets it for them around the
        # fork. (forkserver or spawn would re-run an unguarded calling script in every worker.)
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            pool = multiprocessing.get_context("fork").Pool(workers)
        finally:
            cv2.setNumThreads(threads)
        with pool:
            for done in pool.imap_unordered(_generate_task, jobs):
                bar.update(done)


def load_split(cache: Path, settings, split: str) -> list:
    """[(image_path, points float32 (N, 2) x, y), ...] of `split`, in `split_samples` order.
    The cache must be complete for the settings (`ensure_cache`); otherwise a DataError says what is missing."""
    s = shapes_settings(settings)
    cache = Path(cache)
    manifest = _read_manifest(cache)
    if not manifest or manifest.get("identity") != _identity(s):
        raise DataError(f"{cache}: no synthetic shapes cache for these generation parameters; "
                        "call ensure_cache(data_path, settings) first")
    points = {}
    for p in s.primitives:
        count = s.split_count(p, split)
        chunks = _chunk_files(cache / p / "points" / split)
        per_image = []
        for start in _chunk_starts(count):
            stop, path = chunks.get(start, (-1, None))
            if stop < min(start + CHUNK_SIZE, count):
                raise DataError(f"{cache / p / 'points' / split}: images {start}.. are missing; "
                                "call ensure_cache(data_path, settings) first")
            data = load_npz(path, ["points", "counts"])
            per_image.extend(np.split(data["points"], np.cumsum(data["counts"])[:-1]))
        points[p] = per_image[:count]
    return [(cache / p / "images" / split / f"{i}.png", points[p][i]) for p, i in split_samples(s, split)]
