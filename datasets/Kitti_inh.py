"""KITTI raw drives listed in split files (reference-spec section 3.6).

`<root_split_txt>/<task>.txt` lists one drive and camera per line, e.g. `2011_09_26_drive_0020_sync_02`;
its frames are `<root>/2011_09_26_drive_0020_sync/image_02/data/*` (JPEG or PNG, sorted). A sample's
name is `<line>/<frame>`, so exports go to `<split>/<line>/<frame>.npz` and training finds its labels
there. Unlike the reference, a last line without a newline is read correctly, and drives that are
absent under `root` are reported (count and first names) and skipped.

A relative `root` or `root_split_txt` is looked up under DATA_PATH first, then under the working
directory (where the reference looked).

Training (`data.labels` set; see datasets/Coco.py): the labels of frame `<line>/<frame>` are
`<labels>/<task>/<line>/<frame>.npz`, the layout the KITTI export writes; frames without one are skipped.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from datasets.Coco import IMAGE_SUFFIXES, Coco, find_folder, list_images
from utils.config import combine
from utils.io import DataError

log = logging.getLogger(__name__)

default_conf = combine(Coco.default_conf, {
    "dataset": "Kitti_inh",
    "root": None,  # folder of the drive folders
    "root_split_txt": None,  # folder of train.txt / val.txt
    "preprocessing": {"resize": [384, 1248]},
})

_LINE = re.compile(r"^(?P<drive>\S+)_(?P<camera>\d\d)$")


def resolve_path(value, key: str, data_path: Path, source: str) -> Path:
    """A configured folder: absolute as given, relative under DATA_PATH, else under the working directory."""
    return find_folder(value, key, [data_path, Path.cwd()], source)


def read_split(path: Path) -> list[str]:
    """Non-empty stripped lines of a split file (a last line without a newline included)."""
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_frames(split_file: Path, folder_of: Callable[[str], Path], suffixes, what: str, layout: str,
                 log_name: str) -> tuple[list[dict], list[str]]:
    """Frames of every entry of a split file, as samples named `<entry>/<frame>`.

    folder_of: entry -> its folder of frames. Entries without frames are skipped with one warning and
    returned as the second value; a split without any frame is a DataError naming `layout`.
    """
    entries = read_split(split_file)
    samples, absent = [], []
    for entry in entries:
        folder = folder_of(entry)
        frames = list_images(folder, suffixes) if folder.is_dir() else []
        if not frames:
            absent.append(entry)
            continue
        samples += [{"image": p, "name": f"{entry}/{p.stem}"} for p in frames]
    if absent:
        log.warning("%s: %d of %d %s of %s have no frames and are skipped: %s%s", log_name, len(absent),
                    len(entries), what, split_file, ", ".join(absent[:5]), " ..." if len(absent) > 5 else "")
    if not samples:
        raise DataError(f"{log_name}: none of the {len(entries)} {what} of {split_file} has frames "
                        f"({', '.join(suffixes)}) under {layout}")
    return samples, absent


class Kitti_inh(Coco):  # noqa: N801 (reference name)
    """Frames of the KITTI drives of one split. Samples (export or training) as `Coco`, named `<line>/<frame>`."""

    default_conf = default_conf

    def list_samples(self, data_path: Path) -> list[dict]:
        root = resolve_path(self.conf["root"], "root", data_path, self.source)
        split_dir = resolve_path(self.conf["root_split_txt"], "root_split_txt", data_path, self.source)
        split_file = split_dir / f"{self.task}.txt"

        def folder_of(line: str) -> Path:
            match = _LINE.match(line)
            if match is None:
                raise DataError(f"{split_file}: line {line!r} is not '<drive>_<camera>' "
                                f"(e.g. 2011_09_26_drive_0020_sync_02)")
            return root / match["drive"] / f"image_{match['camera']}" / "data"

        samples, self.absent_drives = split_frames(split_file, folder_of, IMAGE_SUFFIXES, "drives",
                                                   f"{root}/<drive>/image_<camera>/data", f"KITTI {self.task}")
        return samples
