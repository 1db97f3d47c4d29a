"""Built-in natural images and HPatches-style sequences made from them, for `make quickstart`.

The images are the samples scikit-image ships inside its package (no download). They are split into
training images (homography-adaptation labels, joint training) and held-out evaluation images. From
each evaluation image `write_sequences` makes two sequences in the HPatches layout that
`datasets.patches_dataset` reads (`<root>/<seq>/1.ppm ... 6.ppm` and `H_1_k`, pixel homographies
image 1 -> image k):

* `v_<name>`: viewpoint changes, five known random homographies (utils.geometry.sample_homography)
  and mild photometric changes;
* `i_<name>`: illumination changes, the identity homography and strong photometric changes.

Everything is drawn from a seeded generator, so the same seed gives the same files on every machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from utils.geometry import denormalize_homography, sample_homography
from utils.images import read_image
from utils.io import save_image, write_text
from utils.photometric import PhotometricAugmentation

# Held out for evaluation; every other shipped photograph-like sample is a training image.
EVAL_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket")
# Shipped samples that are not photographs of scenes (or duplicate an evaluation scene).
EXCLUDED = ("motorcycle_left", "motorcycle_right", "chessboard_RGB", "multipage", "multipage_rgb")
SUFFIXES = (".png", ".jpg", ".jpeg")

# Sequences are drawn at this size (H, W), the size of the quickstart's evaluation.
SEQUENCE_SIZE = (240, 320)
VIEWPOINT_HOMOGRAPHY = {
    "translation": True, "rotation": True, "scaling": True, "perspective": True,
    "scaling_amplitude": 0.15, "perspective_amplitude_x": 0.15, "perspective_amplitude_y": 0.15,
    "patch_ratio": 0.8, "max_angle": 0.4, "allow_artifacts": False,
}
MILD_PHOTOMETRIC = {
    "primitives": ["random_brightness", "random_contrast", "additive_gaussian_noise"],
    "params": {"random_brightness": {"max_abs_change": 20}, "random_contrast": {"strength_range": [0.8, 1.2]},
               "additive_gaussian_noise": {"stddev_range": [0, 3]}},
}
STRONG_PHOTOMETRIC = {
    "primitives": ["random_brightness", "random_contrast", "additive_gaussian_noise", "additive_shade"],
    "params": {"random_brightness": {"max_abs_change": 60}, "random_contrast": {"strength_range": [0.5, 1.5]},
               "additive_gaussian_noise": {"stddev_range": [0, 6]},
               "additive_shade": {"transparency_range": [-0.5, 0.5], "kernel_size_range": [100, 150]}},
}


def sample_image_dir() -> Path:
    """The folder of scikit-image's shipped sample images; a clear error when scikit-image is missing."""
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError("the built-in images are scikit-image's samples: pip install scikit-image "
                           "(it is in requirements.txt; `make venv` installs it)") from e
    return Path(skimage.data.__file__).parent


def builtin_images(folder: Path | None = None) -> dict[str, Path]:
    """name -> file of every usable shipped sample image, sorted by name."""
    folder = folder or sample_image_dir()
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES and p.stem not in EXCLUDED}
    missing = [n for n in EVAL_IMAGES if n not in found]
    if missing:
        raise RuntimeError(f"{folder}: scikit-image's sample images {missing} are missing; expected the "
                           f"package's own data folder")
    return found


def split_images(images: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(training names, evaluation names)."""
    return [n for n in images if n not in EVAL_IMAGES], [n for n in EVAL_IMAGES if n in images]


def fit_to_size(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre crop to the aspect ratio of size (H, W), then resize with INTER_AREA: (H, W) uint8."""
    h_out, w_out = size
    h, w = image.shape
    scale = min(h / h_out, w / w_out)
    crop_h, crop_w = int(round(h_out * scale)), int(round(w_out * scale))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = image[top:top + crop_h, left:left + crop_w]
    return cv2.resize(crop, (w_out, h_out), interpolation=cv2.INTER_AREA)


def write_image_folder(out_dir: Path, names: Sequence[str], images: dict[str, Path]) -> list[Path]:
    """Write the named images into out_dir as grey PNGs; returns the written files."""
    written = []
    for name in names:
        path = out_dir / f"{name}.png"
        save_image(path, read_image(images[name]))
        written.append(path)
    return written


def _photometric(conf: dict, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = PhotometricAugmentation({"enable": True, **conf})(image.astype(np.float32) / 255.0, rng)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def make_sequence(image: np.ndarray, rng: np.random.Generator, viewpoint: bool,
                  n_views: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One sequence from a (H, W) uint8 image: (images [reference, view 2, ...], homographies
    reference -> view k as (3, 3) float64 pixel matrices)."""
    h, w = image.shape
    views, homographies = [image], []
    for _ in range(n_views):
        if viewpoint:
            homography = denormalize_homography(sample_homography(rng, VIEWPOINT_HOMOGRAPHY), h, w)
            homography = np.asarray(homography, dtype=np.float64)
            homography /= homography[2, 2]
            warped = cv2.warpPerspective(image, homography, (w, h), flags=cv2.INTER_LINEAR)
            views.append(_photometric(MILD_PHOTOMETRIC, warped, rng))
        else:
            homography = np.eye(3)
            views.append(_photometric(STRONG_PHOTOMETRIC, image, rng))
        homographies.append(homography)
    return views, homographies


def write_sequences(root: Path, names: Sequence[str], images: dict[str, Path], seed: int = 0,
                    size: Sequence[int] = SEQUENCE_SIZE) -> list[str]:
    """Write a `v_<name>` and an `i_<name>` sequence per named image under root; returns their names."""
    rng = np.random.default_rng(seed)
    written = []
    for name in names:
        image = fit_to_size(read_image(images[name]), size)
        for prefix, viewpoint in (("i", False), ("v", True)):
            seq = root / f"{prefix}_{name}"
            views, homographies = make_sequence(image, rng, viewpoint)
            for k, view in enumerate(views, start=1):
                save_image(seq / f"{k}.ppm", cv2.cvtColor(view, cv2.COLOR_GRAY2BGR))  # PPM holds colour
            for k, homography in enumerate(homographies, start=2):
                write_text(seq / f"H_1_{k}", "\n".join(" ".join(f"{v:.10e}" for v in row) for row in homography) + "\n")
            written.append(seq.name)
    return written
