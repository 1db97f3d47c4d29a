"""Image files: reading (grey, corrupt files named), listing, folders of the config, and the sizes the
network is fed at. Datasets, exports and scripts read and list images only through here.

Images become (1, H, W) float32 tensors in [0, 1]; a resize is OpenCV's INTER_AREA to exactly (H, W)
(the reference resized the same way, without keeping the aspect ratio). Training and HPatches sizes
are multiples of 8 (`check_resize`); the feature export reads and sizes images as hloc does
(`read_grey_decoded`, `network_size`, `resize_as_float`).
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


JPEG_SCAN, JPEG_END = b"\xff\xda", b"\xff\xd9"
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def truncation(data: bytes) -> str | None:
    """Why the bytes of a JPEG or PNG file are incomplete, or None (other formats: None).

    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey) and may do the
    same for a PNG, so the end markers are checked: a JPEG's end-of-image marker must follow its first
    scan (compressed scan data cannot contain it; data appended after it, as some cameras write, is
    fine), a PNG must hold its IEND chunk.
    """
    if data[:2] == b"\xff\xd8":
        scan = data.find(JPEG_SCAN)
        if scan < 0 or data.find(JPEG_END, scan) < 0:
            return "truncated JPEG (no end-of-image marker after the image data)"
    elif data[:8] == PNG_SIGNATURE and data.rfind(PNG_END) < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def check_image_file(path: str | Path) -> Path:
    """`path` as a Path; a missing, unreadable or truncated (JPEG, PNG) file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    problem = truncation(data)
    if problem:
        raise DataError(f"{path}: {problem}")
    return path


def read_image(path: str | Path, grayscale: bool = True) -> np.ndarray:
    """Read an image file as uint8 (grey (H, W), or BGR (H, W, 3)); an unreadable, corrupt or truncated
    file is a DataError naming it.

    Grey conversion uses OpenCV's BGR weights (the reference applied the RGB formula to BGR data).
    """
    path = check_image_file(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def read_grey_decoded(path: str | Path, exif_orientation: bool = False) -> np.ndarray:
    """Read an image file as grey uint8 (H, W) the way hloc (and COLMAP) read it: the decoder's own grey
    (for a JPEG its luma plane, which can differ by one level from BGR decoding + cvtColor) and, unless
    `exif_orientation`, the stored pixel grid whatever the EXIF orientation tag says, so that features
    are in the frame of the pixels those tools read. An unreadable file is a DataError."""
    path = check_image_file(path)
    flags = cv2.IMREAD_GRAYSCALE | (0 if exif_orientation else cv2.IMREAD_IGNORE_ORIENTATION)
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def resize_as_float(image: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """uint8 grey (H0, W0) -> (1, H, W) float32 in [0, 1] as hloc prepares it: converted to float first
    (no rounding back to 8 bits), resized to size (H, W) with INTER_AREA, INTER_LINEAR when enlarging."""
    image = image.astype(np.float32)
    if image.shape != tuple(size):
        enlarging = size[0] > image.shape[0] or size[1] > image.shape[1]
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR if enlarging else cv2.INTER_AREA)
    return torch.from_numpy(image / 255.0)[None]


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


def check_resize(resize, source: str = "data", key: str = "preprocessing.resize") -> tuple[int, int]:
    """`preprocessing.resize` (or the command line's `key`) as (H, W); anything but two positive
    multiples of 8 is a ConfigError naming `source` and `key`."""
    size = tuple(resize) if isinstance(resize, (list, tuple)) else ()
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 8 for v in size):
        raise ConfigError(f"{source}: '{key}' is {resize!r}; expected [H, W], both positive "
                          f"multiples of 8 (e.g. [240, 320])")
    return size


def check_preprocessing(preprocessing: Mapping, source: str = "data") -> dict:
    """Checked `preprocessing` of a feature export: at most one of resize ([H, W], multiples of 8) and
    max_edge (an integer >= 8), see `network_size`; resize_force and exif_orientation booleans
    (default false)."""
    resize, max_edge = preprocessing.get("resize"), preprocessing.get("max_edge")
    flags = {key: preprocessing.get(key) or False for key in ("resize_force", "exif_orientation")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: 'preprocessing.{key}' is {value!r}; expected true or false")
    if resize is not None and max_edge is not None:
        raise ConfigError(f"{source}: set one of 'preprocessing.resize' and 'preprocessing.max_edge', not both")
    if resize is not None:
        resize = list(check_resize(resize, source))
    if max_edge is not None:
        max_edge = check_int(max_edge, "preprocessing.max_edge", source, minimum=8, example=1024)
    return {"resize": resize, "max_edge": max_edge, **flags}


def network_size(height: int, width: int, preprocessing: Mapping) -> tuple[int, int]:
    """(H, W) an image of size (height, width) is resized to before extraction:
      resize: [H, W]  exactly H x W;
      max_edge: M     hloc's resize_max: when the longer side exceeds M (always, with resize_force), both
                      sides scaled by M / longer side and rounded to the nearest integer (a 900 x 600
                      image at M = 640 becomes 640 x 427);
      neither         the image's own size.
    Sizes need not be multiples of 8 (models.extractor: the last partial cells get no keypoints)."""
    if preprocessing.get("resize"):
        return tuple(preprocessing["resize"])
    max_edge = preprocessing.get("max_edge")
    if max_edge and (preprocessing.get("resize_force") or max(height, width) > max_edge):
        scale = max_edge / max(height, width)
        return max(8, int(round(height * scale))), max(8, int(round(width * scale)))
    return height, width
