"""KITTI raw drives listed in split files, laid out as the reference's Kitti_inh dataset reads them.

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

import re
from pathlib import Path

from datasets.Coco import Coco
from utils.config import combine
from utils.images import IMAGE_SUFFIXES, resolve_path, split_frames
from utils.io import DataError

default_conf = combine(Coco.default_conf, {
    "dataset": "Kitti_inh",
    "root": None,  # folder of the drive folders
    "root_split_txt": None,  # folder of train.txt / val.txt
    "preprocessing": {"resize": [384, 1248]},
})

_LINE = re.compile(r"^(?P<drive>\S+)_(?P<camera>\d\d)$")


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
