"""Photometric augmentation with the reference's primitives and parameters, in numpy / OpenCV, float32 throughout.

Images are (H, W) float32 in [0, 1]. The configs give intensities in the reference's 0-255 units
(`max_abs_change: 75`, `stddev_range: [0, 15]`); they are divided by 255 here, and every primitive
clips its result to [0, 1] (as the TF reference clips to [0, 255]). Nothing is quantised to uint8.

Each primitive is `name(image, rng, **params) -> image` with an `np.random.Generator`, so one seed
gives one result. `PhotometricAugmentation(conf)` applies the configured primitives:
* `primitives`: a list of names (applied in that order) or `all` (every primitive, in the order of
  `params`);
* `random_order: true` shuffles that order for every image (the TF reference's behaviour; the
  PyTorch reference always used a fixed order);
* `params.<primitive>`: that primitive's parameters, merged over the defaults below.

Departures from the PyTorch reference (which also needed imgaug and TensorFlow): `motion_blur` is a real
motion blur for any `max_kernel_size` (the reference appended the speckle noise again for sizes
other than 3); `additive_shade` is one primitive among the others, ordered like them (the reference
always applied it last); contrast pivots on the image mean (TF's `random_contrast`).
"""
from __future__ import annotations

from typing import Mapping

import cv2
import numpy as np

from utils.config import ConfigError, merge

default_conf = {
    "enable": False,
    # Datasets apply the augmentation to a split when `enable` and the split's flag are both true.
    "enable_train": True,
    "enable_val": False,
    "primitives": "all",
    # Defaults of the TF reference's primitives.
    "params": {
        "random_brightness": {"max_abs_change": 50},
        "random_contrast": {"strength_range": [0.5, 1.5]},
        "additive_gaussian_noise": {"stddev_range": [5, 95]},
        "additive_speckle_noise": {"prob_range": [0.0, 0.005]},
        "additive_shade": {"nb_ellipses": 20, "transparency_range": [-0.5, 0.8],
                           "kernel_size_range": [250, 350]},
        "motion_blur": {"max_kernel_size": 10},
    },
    "random_order": False,
}


def random_brightness(image: np.ndarray, rng: np.random.Generator, max_abs_change: float) -> np.ndarray:
    """Add one offset drawn from U(-max_abs_change, max_abs_change) (0-255 units) to every pixel."""
    delta = rng.uniform(-max_abs_change, max_abs_change) / 255.0
    return np.clip(image + np.float32(delta), 0.0, 1.0)


def random_contrast(image: np.ndarray, rng: np.random.Generator, strength_range) -> np.ndarray:
    """Scale the deviations from the image mean by a factor drawn from U(strength_range)."""
    factor = np.float32(rng.uniform(*strength_range))
    mean = np.float32(image.mean())
    return np.clip((image - mean) * factor + mean, 0.0, 1.0)


def additive_gaussian_noise(image: np.ndarray, rng: np.random.Generator, stddev_range) -> np.ndarray:
    """Add i.i.d. N(0, s^2) noise per pixel, s drawn from U(stddev_range) (0-255 units)."""
    stddev = rng.uniform(*stddev_range) / 255.0
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(stddev)
    return np.clip(image + noise, 0.0, 1.0)


def additive_speckle_noise(image: np.ndarray, rng: np.random.Generator, prob_range) -> np.ndarray:
    """Salt and pepper: with p drawn from U(prob_range), each pixel turns black with probability p and
    white with probability p."""
    prob = rng.uniform(*prob_range)
    draw = rng.random(image.shape, dtype=np.float32)
    out = np.where(draw < prob, np.float32(0.0), image)
    return np.where(draw >= 1.0 - prob, np.float32(1.0), out)


def additive_shade(image: np.ndarray, rng: np.random.Generator, nb_ellipses: int, transparency_range,
                   kernel_size_range) -> np.ndarray:
    """Darken (or lighten, for a negative transparency) the image under a blurred mask of random
    filled ellipses: out = image * (1 - t * mask), t drawn from U(transparency_range), mask in [0, 1]
    blurred by a Gaussian of odd size drawn from kernel_size_range (OpenCV derives sigma from it).
    """
    h, w = image.shape
    min_dim = min(h, w) / 4
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(nb_ellipses)):
        ax = int(max(rng.random() * min_dim, min_dim / 5))
        ay = int(max(rng.random() * min_dim, min_dim / 5))
        max_rad = max(ax, ay)
        x = int(rng.integers(max_rad, max(w - max_rad, max_rad + 1)))
        y = int(rng.integers(max_rad, max(h - max_rad, max_rad + 1)))
        angle = rng.random() * 90
        cv2.ellipse(mask, (x, y), (ax, ay), angle, 0, 360, 255, -1)
    transparency = rng.uniform(*transparency_range)
    lo, hi = (int(v) for v in kernel_size_range)
    kernel_size = int(rng.integers(lo, max(hi, lo + 1)))
    kernel_size += 1 - kernel_size % 2  # odd, as OpenCV requires
    blurred = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (kernel_size, kernel_size), 0)
    return np.clip(image * (1.0 - np.float32(transparency) * blurred), 0.0, 1.0)


MOTION_DIRECTIONS = ("horizontal", "vertical", "diagonal_down", "diagonal_up")


def motion_blur_kernel(size: int, direction: str) -> np.ndarray:
    """(size, size) float32 kernel summing to 1: a line through the centre in `direction`, weighted by
    a Gaussian of variance size^2 / 16 around the centre (the TF reference's kernel). size is odd."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"motion blur kernel size must be odd and >= 1, got {size}")
    line = {
        "horizontal": lambda: np.pad(np.ones((1, size)), ((size // 2, size // 2), (0, 0))),
        "vertical": lambda: np.pad(np.ones((size, 1)), ((0, 0), (size // 2, size // 2))),
        "diagonal_down": lambda: np.eye(size),
        "diagonal_up": lambda: np.flipud(np.eye(size)),
    }
    if direction not in line:
        raise ValueError(f"motion blur direction {direction!r}; expected one of {MOTION_DIRECTIONS}")
    offsets = np.arange(size) - size // 2
    gaussian = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2.0 * size * size / 16.0))
    kernel = line[direction]() * gaussian
    return (kernel / kernel.sum()).astype(np.float32)


def motion_blur(image: np.ndarray, rng: np.random.Generator, max_kernel_size: int) -> np.ndarray:
    """Blur along one random direction (horizontal, vertical or a diagonal) with a kernel of odd size
    drawn uniformly from 1, 3, ..., up to max_kernel_size (size 1 leaves the image unchanged).
    Borders are reflected, so a constant image stays constant."""
    if max_kernel_size < 1:
        raise ValueError(f"motion_blur.max_kernel_size must be >= 1, got {max_kernel_size}")
    direction = MOTION_DIRECTIONS[int(rng.integers(len(MOTION_DIRECTIONS)))]
    size = 2 * int(rng.integers(0, (int(max_kernel_size) + 1) // 2)) + 1
    if size == 1:
        return image
    return cv2.filter2D(image, -1, motion_blur_kernel(size, direction), borderType=cv2.BORDER_REFLECT_101)


PRIMITIVES = {
    "random_brightness": random_brightness,
    "random_contrast": random_contrast,
    "additive_gaussian_noise": additive_gaussian_noise,
    "additive_speckle_noise": additive_speckle_noise,
    "additive_shade": additive_shade,
    "motion_blur": motion_blur,
}


class PhotometricAugmentation:
    """The configured sequence of photometric primitives.

    conf: an `augmentation.photometric` section (merged over `default_conf`; unknown keys or primitive
    names are ConfigErrors naming them). source: the file named in errors.
    """

    def __init__(self, conf: Mapping | None = None, source: str = "config",
                 prefix: str = "augmentation.photometric."):
        self.conf = merge(default_conf, conf, source, prefix)
        names = self.conf["primitives"]
        if names == "all":
            names = list(self.conf["params"])
        elif isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in PRIMITIVES]
        if unknown:
            raise ConfigError(f"{source}: '{prefix}primitives' names unknown primitives {unknown}; "
                              f"expected some of {list(PRIMITIVES)}")
        self.steps = [(PRIMITIVES[n], self.conf["params"][n]) for n in names]

    def enabled_for(self, task: str) -> bool:
        """Whether a dataset of this task ('train' or 'val') applies the augmentation."""
        split_flag = self.conf["enable_train"] if task == "train" else self.conf["enable_val"]
        return bool(self.conf["enable"] and split_flag)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """image: (H, W) float in [0, 1] -> augmented (H, W) float32 in [0, 1]."""
        out = np.asarray(image, dtype=np.float32)
        order = rng.permutation(len(self.steps)) if self.conf["random_order"] else range(len(self.steps))
        for i in order:
            fn, params = self.steps[i]
            out = fn(out, rng, **params)
        return out
