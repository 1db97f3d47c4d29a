"""Image files: reading (grey, corrupt files named), listing, folders of the config, and the sizes the
network is fed at. Datasets, exports and scripts read and list images only through here.

Images become (1, H, W) float32 tensors in [0, 1]; a resize is OpenCV's INTER_AREA to exactly (H, W)
(the reference resized the same way, without keeping the aspect ratio). The network needs H and W
divisible by 8, which `check_resize` and `network_size` guarantee.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch

from utils.config import ConfigError, check_int
from utils.io import DataError

log = logging.getLogger(__name__)

# Files listed as images (case-insensitive), everywhere: OpenCV reads all of them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | Path, grayscale: bool = True) -> np.ndarray:
    """Read an image file as uint8 (grey (H, W), or BGR (H, W, 3)); an unreadable file is a DataError.

    Grey conversion uses OpenCV's BGR weights (the reference applied the RGB formula to BGR data).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def image_to_tensor(image: np.ndarray, size: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 grey (H0, W0) -> (1, H, W) float32 in [0, 1], resized to size (H, W) with INTER_AREA
    (None or the same size: as is)."""
    if size is not None and image.shape != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def load_image(path: str | Path, size: Sequence[int] | None = None) -> torch.Tensor:
    """Grey image file as (1, H, W) float32 in [0, 1] (`image_to_tensor`); unreadable: a DataError."""
    return image_to_tensor(read_image(path), size)


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Image files of a folder (by suffix, case-insensitive), sorted."""
    files = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in suffixes)


def find_folder(value, key: str, bases: Sequence[Path], source: str) -> Path:
    """A configured folder: absolute as given, relative under each of `bases` in turn (the first that
    exists). Unset or not found: a DataError naming `data.<key>` and the places looked at."""
    if not value:
        raise DataError(f"{source}: data.{key} is not set; expected a folder")
    path = Path(value)
    candidates = [path] if path.is_absolute() else [Path(base) / path for base in bases]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{source}: data.{key} folder not found: looked in {', '.join(map(str, candidates))}")


def resolve_path(value, key: str, data_path: Path, source: str) -> Path:
    """A configured data folder: absolute as given, relative under DATA_PATH, else under the working
    directory (where the reference looked)."""
    return find_folder(value, key, [data_path, Path.cwd()], source)


def read_split(path: Path) -> list[str]:
    """Non-empty stripped lines of a split file (a last line without a newline included)."""
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_frames(split_file: Path, folder_of: Callable[[str], Path], suffixes, what: str, layout: str,
                 log_name: str) -> tuple[list[dict], list[str]]:
    """Frames of every entry of a split file, as samples {'image': path, 'name': '<entry>/<frame>'}.

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


def check_resize(resize, source: str = "data") -> tuple[int, int]:
    """`preprocessing.resize` as (H, W); anything but two positive multiples of 8 is a ConfigError."""
    size = tuple(resize or ())
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 8 for v in size):
        raise ConfigError(f"{source}: 'preprocessing.resize' is {resize!r}; expected [H, W], both positive "
                          f"multiples of 8 (e.g. [240, 320])")
    return size


def check_preprocessing(preprocessing: Mapping, source: str = "data") -> dict:
    """Checked `preprocessing` of a feature export: at most one of resize ([H, W], multiples of 8) and
    max_edge (an integer >= 8); see `network_size`."""
    resize, max_edge = preprocessing.get("resize"), preprocessing.get("max_edge")
    if resize is not None and max_edge is not None:
        raise ConfigError(f"{source}: set one of 'preprocessing.resize' and 'preprocessing.max_edge', not both")
    if resize is not None:
        resize = list(check_resize(resize, source))
    if max_edge is not None:
        max_edge = check_int(max_edge, "preprocessing.max_edge", source, minimum=8, example=1024)
    return {"resize": resize, "max_edge": max_edge}


def network_size(height: int, width: int, preprocessing: Mapping) -> tuple[int, int]:
    """(H, W) an image of size (height, width) is resized to before extraction:
      resize: [H, W]  exactly H x W;
      max_edge: M     shrunk (never enlarged) so the longer side is at most M, each side rounded down to
                      a multiple of 8 (per-axis factors, so the aspect ratio changes by < 8 px);
      neither         the image's own size (the extractor crops to multiples of 8)."""
    if preprocessing.get("resize"):
        return tuple(preprocessing["resize"])
    max_edge = preprocessing.get("max_edge")
    if max_edge and max(height, width) > max_edge:
        scale = max_edge / max(height, width)
        return max(8, int(height * scale) // 8 * 8), max(8, int(width * scale) // 8 * 8)
    return height, width
