"""HPatches sequences with the reference's protocol (image 1 paired with images 2-6 of every
sequence, resized as below), so that the numbers are comparable with the reference's table.

Each sequence folder holds `1.ppm` ... `6.ppm` and `H_1_k` (pixel homographies image 1 -> image k);
it gives 5 pairs (1, k). Per image: grey (OpenCV's BGR weights), crop the top-left part that has the
target aspect ratio, resize to `preprocessing.resize` with INTER_AREA. The homography is adjusted with
each image's own scale factors (the reference used the first image's for both). Sequences are visited
in sorted order, so the index of a pair is the same on every machine.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import cv2

from utils.config import IGNORED, ConfigError, check_choice, merge
from utils.geometry import scale_homography
from utils.images import read_image
from utils.io import DataError

log = logging.getLogger(__name__)

default_conf = {
    "dataset": "hpatches",
    "name": "patches_dataset",
    "alteration": "all",  # i (illumination), v (viewpoint) or all
    "preprocessing": {"resize": [240, 320]},
    "truncate": None,  # keep only the first n pairs
    "root": None,  # default: <DATA_PATH>/HPatches
    "cache_in_memory": IGNORED,
}


def preprocess(image: np.ndarray, size) -> tuple[np.ndarray, tuple[float, float]]:
    """Crop the top-left region with the target aspect ratio, then resize with INTER_AREA.

    image: (h, w) uint8. size: (H, W). Returns (float32 (H, W) in [0, 1], (sx, sy) resize factors of
    the cropped region, so that a pixel centre x of the original maps to (x + 0.5) sx - 0.5).
    """
    h_out, w_out = size
    h, w = image.shape[:2]
    s = max(h_out / h, w_out / w)
    crop_h, crop_w = int(h_out / s), int(w_out / s)
    cropped = image[:crop_h, :crop_w]
    resized = cv2.resize(cropped, (w_out, h_out), interpolation=cv2.INTER_AREA)
    return resized.astype(np.float32) / 255.0, (w_out / crop_w, h_out / crop_h)


def read_homography(path: Path) -> np.ndarray:
    try:
        h = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable 3x3 homography ({e})") from e
    if h.shape != (3, 3):
        raise DataError(f"{path}: expected a 3x3 homography, got shape {h.shape}")
    return h


class PatchesDataset(torch.utils.data.Dataset):
    """Pairs (image 1, image k) of HPatches sequences.

    Sample: {'image', 'warped_image': (1, H, W) float32 in [0, 1]; 'homography': (3, 3) float64 pixel
    homography image -> warped_image; 'name': '<sequence>/1_<k>'; 'scene_name': sequence}.
    """

    def __init__(self, conf: Mapping | None = None, task: str = "test", seed: int = 0,
                 data_path: str | Path = "datasets", source: str = "data"):
        self.conf = merge(default_conf, conf, source=source)
        self.size = tuple(self.conf["preprocessing"]["resize"] or ())
        if len(self.size) != 2 or any(int(v) <= 0 or int(v) % 8 for v in self.size):
            raise ConfigError(f"{source}: 'preprocessing.resize' is {self.conf['preprocessing']['resize']!r}; "
                              f"expected [H, W], both positive multiples of 8 (e.g. [240, 320])")
        check_choice(self.conf["alteration"], ("i", "v", "all"), "alteration", source)
        root = Path(self.conf["root"] or Path(data_path) / "HPatches")
        if not root.is_dir():
            raise DataError(f"HPatches folder not found: {root} (set DATA_PATH to the folder that holds "
                            f"HPatches/, or data.root)")
        self.root = root
        self.pairs, self.skipped = self._list_pairs(root)
        if self.conf["truncate"]:
            self.pairs = self.pairs[: int(self.conf["truncate"])]
        if not self.pairs:
            raise DataError(f"{root}: no HPatches pairs found (expected sequence folders with 1.ppm, k.ppm, H_1_k)")

    def _list_pairs(self, root: Path):
        alteration = self.conf["alteration"]
        pairs, skipped = [], []
        for seq in sorted(p for p in root.iterdir() if p.is_dir()):
            if alteration != "all" and not seq.name.startswith(alteration):
                continue
            ext = ".ppm" if (seq / "1.ppm").exists() else ".jpg"
            for k in range(2, 7):
                files = [seq / f"1{ext}", seq / f"{k}{ext}", seq / f"H_1_{k}"]
                missing = [str(f) for f in files if not f.exists()]
                if missing:
                    skipped.append((f"{seq.name}/1_{k}", missing))
                    log.warning("HPatches pair %s/1_%d skipped: missing %s", seq.name, k, ", ".join(missing))
                    continue
                pairs.append({"sequence": seq.name, "image": files[0], "warped_image": files[1],
                              "homography": files[2], "name": f"{seq.name}/1_{k}"})
        return pairs, skipped

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        image, s1 = preprocess(read_image(pair["image"]), self.size)
        warped, s2 = preprocess(read_image(pair["warped_image"]), self.size)
        homography = scale_homography(read_homography(pair["homography"]), s1, s2)
        return {
            "image": torch.from_numpy(image)[None],
            "warped_image": torch.from_numpy(warped)[None],
            "homography": torch.from_numpy(homography),
            "name": pair["name"],
            "scene_name": pair["sequence"],
        }
