"""TUM RGB-D sequences, laid out as the reference's Tum dataset and its
superpoint_tum_train_heatmap.yaml expect: `<root>/<scene>/rgb/*.png`.

`<root_split_txt>/<task>.txt` lists one scene folder per line (e.g. `rgbd_dataset_freiburg1_desk`);
without `root_split_txt` the split files are looked up in `root`. A sample's name is
`<scene>/<frame>` (frame: the file stem, e.g. `1305031452.791720`), so exports go to
`<split>/<scene>/<frame>.npz` and training (`data.labels` set; see datasets/Coco.py) reads
`<labels>/<task>/<scene>/<frame>.npz`. Images are read grey and resized like COCO's (480 x 640 in
the reference's config). Scenes absent under `root` are reported and skipped. Unlike the reference,
no TensorFlow is needed and samples are not shuffled at construction (the trainer's sampler shuffles).

A relative `root` or `root_split_txt` is looked up under DATA_PATH first, then under the working directory.
"""
from __future__ import annotations

from pathlib import Path

from datasets.Coco import Coco
from utils.config import combine
from utils.images import resolve_path, split_frames

default_conf = combine(Coco.default_conf, {
    "dataset": "Tum",
    "root": None,  # folder of the scene folders
    "root_split_txt": None,  # folder of train.txt / val.txt (default: root)
    "preprocessing": {"resize": [480, 640]},
})

FRAME_SUFFIXES = (".png",)


class Tum(Coco):
    """Frames of the TUM scenes of one split. Samples (export or training) as `Coco`, named `<scene>/<frame>`."""

    default_conf = default_conf

    def list_samples(self, data_path: Path) -> list[dict]:
        root = resolve_path(self.conf["root"], "root", data_path, self.source)
        split_dir = root
        if self.conf["root_split_txt"]:
            split_dir = resolve_path(self.conf["root_split_txt"], "root_split_txt", data_path, self.source)
        split_file = split_dir / f"{self.task}.txt"
        samples, self.absent_scenes = split_frames(split_file, lambda scene: root / scene / "rgb", FRAME_SUFFIXES,
                                                   "scenes", f"{root}/<scene>/rgb", f"TUM {self.task}")
        return samples
