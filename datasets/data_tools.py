"""Label tools shared by every training dataset (synthetic shapes, COCO, KITTI, TUM).

Points follow the convention of utils.geometry: (N, 2) float tensors of (x, y) pixels, pixel centres at
integers, so a point belongs to the pixel round(x), round(y). Label maps are float32 (H, W) tensors;
the sample-level (1, H, W) shapes are the datasets' business.

* `points_to_label_map` / `points_to_residuals`: binary labels at the rounded points and the sub-pixel
  residuals p - round(p) (the reference's `labels_2D` and `labels_res`).
* `bilinear_splat` + `gaussian_blur` = `gaussian_label_map`: the soft labels of `gaussian_label`.
* `sample_pixel_homography`, `warp_sample` and `warped_pair`: homographic augmentation and the warped
  pair of the reference's Coco dataset, built on utils.geometry only.
* `TrainingSample`: the whole training sample of a dataset from an image and its keypoints
  (photometric, then homographic augmentation, labels, soft labels, warped pair), driven by the data
  keys of `training_defaults`, which every training dataset shares.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from utils import photometric
from utils.config import IGNORED, check_positive
from utils.io import DataError
from utils.geometry import (HOMOGRAPHY_DEFAULTS, denormalize_homography, inside_image, sample_homography,
                            valid_mask, warp_image, warp_points)

# The `data` keys read by `TrainingSample` (those of the reference's training configs), with its defaults.
training_defaults = {
    "gaussian_label": {
        "enable": False,
        "sigma": IGNORED,  # a TF-era spelling; the sigma used is params.GaussianBlur.sigma
        "params": {"GaussianBlur": {"sigma": 0.2}},
    },
    "augmentation": {
        "photometric": photometric.default_conf,
        "homographic": {
            "enable": False,
            "enable_train": True,
            "enable_val": False,
            "params": HOMOGRAPHY_DEFAULTS,
            "valid_border_margin": 0,
        },
    },
    "warped_pair": {
        "enable": False,
        "params": HOMOGRAPHY_DEFAULTS,
        "valid_border_margin": 0,
    },
}


def points_to_label_map(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Binary (H, W) float32 map with 1 at the pixel of each point (rounded, never truncated).

    points: (N, 2) x, y. Points outside the image (`inside_image`) are ignored.
    """
    labels = torch.zeros(height, width, dtype=torch.float32)
    idx = points[inside_image(points, height, width)].round().long()
    labels[idx[:, 1], idx[:, 0]] = 1.0
    return labels


def points_to_residuals(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(2, H, W) float32 map holding p - round(p) (x then y, each in [-0.5, 0.5]) at the pixel of each
    point, zeros elsewhere. points: (N, 2) x, y; points outside the image are ignored. Where two points
    share a pixel, one of them wins."""
    res = torch.zeros(2, height, width, dtype=torch.float32)
    pts = points[inside_image(points, height, width)].float()
    idx = pts.round().long()
    res[:, idx[:, 1], idx[:, 0]] = (pts - pts.round()).T
    return res


def bilinear_splat(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) float32 map where each point spreads a unit mass over its 4 neighbouring pixel centres
    with bilinear weights (so the map's centroid near a point is the point itself). Contributions of
    nearby points add up; weights falling outside the image are dropped.

    points: (N, 2) x, y, sub-pixel.
    """
    pts = points.double()
    base = pts.floor()
    frac = pts - base
    out = torch.zeros(height * width, dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            x, y = base[:, 0].long() + dx, base[:, 1].long() + dy
            wx = frac[:, 0] if dx else 1 - frac[:, 0]
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            ok = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            out.index_add_(0, (y * width + x)[ok], (wx * wy)[ok])
    return out.reshape(height, width).float()


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """(2r+1,) float64 normalised Gaussian weights exp(-d^2 / (2 sigma^2)), r = floor(3 sigma).

    The support stops at 3 sigma (dropped weights are < 1.1 % of the peak): a longer tail would put
    tiny masses into neighbouring cells, and the cell targets (`utils.losses.labels_to_cell_targets`) turn any
    mass in a cell into a keypoint target. With the configs' sigma 0.2 the kernel is [1].
    """
    if not sigma > 0:
        raise ValueError(f"gaussian_label sigma must be > 0, got {sigma}")
    r = int(math.floor(3 * sigma))
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-d * d / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(label_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (..., H, W) maps with the separable Gaussian of `gaussian_kernel1d` (zeros outside the
    image). Returns float32 of the same shape; mass away from the border is preserved."""
    shape = label_map.shape
    k = gaussian_kernel1d(sigma).to(torch.float32)
    r = (len(k) - 1) // 2
    x = label_map.reshape(-1, 1, *shape[-2:]).float()
    x = F.conv2d(x, k.reshape(1, 1, 1, -1), padding=(0, r))
    x = F.conv2d(x, k.reshape(1, 1, -1, 1), padding=(r, 0))
    return x.reshape(shape)


def gaussian_label_map(points: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Soft labels (H, W) float32: the bilinear splat of the points blurred by a Gaussian of `sigma`
    pixels: a real blur, float, never quantised (the reference's 'gaussian' labels were numerically
    unblurred and its warped labels truncated to uint8)."""
    return gaussian_blur(bilinear_splat(points, height, width), sigma)


def sample_pixel_homography(rng: np.random.Generator, params: Mapping | None, height: int,
                            width: int) -> np.ndarray:
    """A random homography (utils.geometry.sample_homography with `params`) as a (3, 3) float64 pixel
    homography mapping an H x W image to its warped version."""
    return denormalize_homography(sample_homography(rng, params), height, width)


def warp_sample(image: torch.Tensor, points: torch.Tensor, homography, erosion: int = 0):
    """Warp an image and its keypoints with one pixel homography.

    image: (C, H, W) float. points: (N, 2) x, y in the image. homography: (3, 3) pixel, image -> warped
    (numpy or tensor). erosion: radius of the valid-mask erosion (`valid_border_margin`).
    Returns (warped image (C, H, W) bilinear with zeros outside, warped points (M, 2) float32 that
    fall inside the image, valid mask (1, H, W) float32).
    """
    _, h, w = image.shape
    hom = torch.as_tensor(homography, dtype=torch.float64)
    warped = warp_image(image[None].float(), hom, mode="bilinear")[0]
    moved = warp_points(points.double(), hom)
    moved = moved[inside_image(moved, h, w)].float()
    mask = valid_mask((h, w), hom, erosion_radius=int(erosion))[0]
    return warped, moved, mask


def warped_pair(image: torch.Tensor, points: torch.Tensor, homography_params: Mapping | None,
                rng: np.random.Generator, erosion: int = 0, base_homography=None) -> dict:
    """The warped half of a training pair (the reference's `warped_pair` of its Coco dataset).

    image: (1, H, W) float, points: (N, 2) x, y in it. A homography H is drawn with
    `sample_pixel_homography(rng, homography_params)`. base_homography: optional (3, 3) pixel
    homography from `image` to the sample's own image (the sample's homographic augmentation); the
    pair is then rendered from `image` through H @ base in one interpolation, and H still maps the
    sample's image to the warped one.
    Returns a dict: `warped_img` (1, H, W), `warped_points` (M, 2), `warped_labels` (1, H, W) binary,
    `warped_res` (2, H, W), `warped_valid_mask` (1, H, W) eroded by `erosion`, `homographies` (3, 3)
    float32 pixel H and `inv_homographies` its inverse.
    """
    _, h, w = image.shape
    hom = sample_pixel_homography(rng, homography_params, h, w)
    total = hom if base_homography is None else hom @ np.asarray(base_homography, dtype=np.float64)
    warped, moved, mask = warp_sample(image, points, total, erosion)
    return {
        "warped_img": warped,
        "warped_points": moved,
        "warped_labels": points_to_label_map(moved, h, w)[None],
        "warped_res": points_to_residuals(moved, h, w),
        "warped_valid_mask": mask,
        "homographies": torch.from_numpy(hom).float(),
        "inv_homographies": torch.from_numpy(np.linalg.inv(hom)).float(),
    }


class TrainingSample:
    """Builds training samples from an image and its keypoints, as configured by a `data` section.

    conf: the dataset's merged `data` section (it holds the keys of `training_defaults`).
    task: 'train' or 'val'. Photometric and homographic augmentation apply to a task when `enable` and
    `enable_<task>` are both true; the warped pair is built for both tasks (its photometric
    augmentation follows the photometric flags).
    """

    def __init__(self, conf: Mapping, task: str, source: str = "data"):
        if task not in ("train", "val"):
            raise ValueError(f"task is {task!r}; expected 'train' or 'val'")
        aug = conf["augmentation"]
        self.photometric = photometric.PhotometricAugmentation(aug["photometric"], source)
        self.photometric_on = self.photometric.enabled_for(task)
        homographic = aug["homographic"]
        self.homographic = homographic if homographic["enable"] and homographic[f"enable_{task}"] else None
        self.pair = conf["warped_pair"] if conf["warped_pair"]["enable"] else None
        self.sigma = None
        if conf["gaussian_label"]["enable"]:
            self.sigma = check_positive(conf["gaussian_label"]["params"]["GaussianBlur"]["sigma"],
                                        "gaussian_label.params.GaussianBlur.sigma", source, example=0.2)

    def __call__(self, image: np.ndarray, points: torch.Tensor, rng: np.random.Generator) -> dict:
        """image: (H, W) float32 in [0, 1]; points: (N, 2) x, y (those off the image are dropped).

        Returns tensors: `image` (1, H, W), `labels_2D` (1, H, W) binary, `valid_mask` (1, H, W),
        `labels_res` (2, H, W); `labels_2D_gaussian` (1, H, W) with gaussian labels; with the warped
        pair the keys of `warped_pair` but `warped_points`, plus `warped_labels_gaussian`.
        Photometric augmentation comes first, then the homographic warp of image, points and mask;
        the labels are built from the warped points. The warped pair is rendered from the clean
        (un-augmented) image and augmented on its own.
        """
        h, w = image.shape
        points = points[inside_image(points, h, w)].float()
        augmented = self.photometric(image, rng) if self.photometric_on else image
        img = torch.from_numpy(np.ascontiguousarray(augmented, dtype=np.float32))[None]
        hom = None
        if self.homographic is not None:
            hom = sample_pixel_homography(rng, self.homographic["params"], h, w)
            img, pts, mask = warp_sample(img, points, hom, self.homographic["valid_border_margin"])
        else:
            pts, mask = points, torch.ones(1, h, w)
        sample = {
            "image": img,
            "labels_2D": points_to_label_map(pts, h, w)[None],
            "valid_mask": mask,
            "labels_res": points_to_residuals(pts, h, w),
        }
        if self.sigma is not None:
            sample["labels_2D_gaussian"] = gaussian_label_map(pts, h, w, self.sigma)[None]
        if self.pair is not None:
            clean = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
            pair = warped_pair(clean, points, self.pair["params"], rng, self.pair["valid_border_margin"],
                               base_homography=hom)
            warped_points = pair.pop("warped_points")
            if self.photometric_on:
                pair["warped_img"] = torch.from_numpy(self.photometric(pair["warped_img"][0].numpy(), rng))[None]
            if self.sigma is not None:
                pair["warped_labels_gaussian"] = gaussian_label_map(warped_points, h, w, self.sigma)[None]
            sample.update(pair)
        return sample


class AugmentationSeeds:
    """The augmentation generator of each access to a training dataset's samples (the scheme of
    datasets/SyntheticDataset_gaussian.py, shared by the image datasets):
    * task 'val': `[seed, index]`, so every validation sees the same samples;
    * after `set_epoch(epoch)` (the trainer calls it before every epoch): `[seed, index, epoch]`, which
      depends on nothing else (workers, rank, access order), so a resumed run repeats an uninterrupted one;
    * otherwise `[seed, index, draw, worker_seed]`, `draw` counting this process's accesses to `index`
      and `worker_seed` the DataLoader worker's torch seed (0 outside workers).
    """

    def __init__(self, seed: int, task: str, length: int):
        self.seed, self.task = int(seed), task
        self.draws = np.zeros(length, np.int64)
        self.epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        if self.task == "val":
            return np.random.default_rng([self.seed, index])
        if self.epoch is not None:
            return np.random.default_rng([self.seed, index, self.epoch])
        worker = torch.utils.data.get_worker_info()
        draw = int(self.draws[index])
        self.draws[index] += 1
        return np.random.default_rng([self.seed, index, draw, worker.seed if worker else 0])


class SkipBadItems(torch.utils.data.Dataset):
    """`dataset` whose unreadable items (a DataError: corrupt, truncated, too small, missing) come out as
    {'bad_item': (name, error)} instead of stopping the DataLoader, worker processes included;
    `collate_skipping_bad` leaves them out of the batch and lists them under 'bad_items' for the
    trainer to report and count. Other errors (bugs) still stop the run."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DataError as e:
            samples = getattr(self.dataset, "samples", None)
            name = samples[index].get("name", index) if isinstance(samples, list) else f"item {index}"
            return {"bad_item": (str(name), str(e))}


def collate_skipping_bad(samples: list) -> dict:
    """default_collate of the good samples, plus 'bad_items': [(name, error)] (no other key when every
    sample of the batch is bad)."""
    good = [s for s in samples if "bad_item" not in s]
    batch = torch.utils.data.default_collate(good) if good else {}
    batch["bad_items"] = [s["bad_item"] for s in samples if "bad_item" in s]
    return batch
