"""Figures for the evaluation (keypoints, matches, warps), drawn with OpenCV.

Every function takes grey images as (H, W) float in [0, 1] or uint8, points as (x, y) pixels, and
returns a uint8 BGR image ready for utils.io.save_image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from utils.geometry import warp_image

GREEN = (0, 255, 0)
RED = (0, 0, 255)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) image, float in [0, 1] or uint8 -> (H, W, 3) uint8 BGR."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def _pixel(point) -> tuple:
    return int(round(float(point[0]))), int(round(float(point[1])))


def draw_keypoints(image: np.ndarray, points: np.ndarray, color=GREEN, radius: int = 2) -> np.ndarray:
    """Filled circles at points (N, 2+) (extra columns such as a score are ignored)."""
    out = to_bgr(image).copy()
    for p in np.asarray(points)[:, :2]:
        if np.all(np.isfinite(p)):
            cv2.circle(out, _pixel(p), radius, color, thickness=-1, lineType=cv2.LINE_AA)
    return out


def side_by_side(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Images placed left to right on a white background, top-aligned, `gap` pixels apart."""
    bgr = [to_bgr(im) for im in images]
    height = max(im.shape[0] for im in bgr)
    width = sum(im.shape[1] for im in bgr) + gap * (len(bgr) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for im in bgr:
        out[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out


def draw_matches(image1: np.ndarray, image2: np.ndarray, matches: np.ndarray, inliers: Optional[np.ndarray] = None,
                 gap: int = 4) -> np.ndarray:
    """The two images side by side with a line per match [x1, y1, x2, y2] (M, 4): green for inliers,
    red for outliers (all green without `inliers`, an (M,) bool mask)."""
    out = side_by_side([image1, image2], gap)
    offset = np.array([to_bgr(image1).shape[1] + gap, 0])
    matches = np.asarray(matches, dtype=np.float64).reshape(-1, 4)
    good = np.ones(len(matches), bool) if inliers is None else np.asarray(inliers, bool)
    for m, ok in zip(matches, good):
        if not np.all(np.isfinite(m)):
            continue
        color = GREEN if ok else RED
        p1, p2 = _pixel(m[:2]), _pixel(m[2:4] + offset)
        cv2.line(out, p1, p2, color, thickness=1, lineType=cv2.LINE_AA)
        cv2.circle(out, p1, 2, color, thickness=-1, lineType=cv2.LINE_AA)
        cv2.circle(out, p2, 2, color, thickness=-1, lineType=cv2.LINE_AA)
    return out


def warp_overlay(image1: np.ndarray, image2: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """[image 1 | image 2 | overlay]: the overlay shows image 1 warped by `homography` (image 1 ->
    image 2, pixels) in magenta over image 2 in green, so a good alignment looks grey."""
    grey1 = to_bgr(image1)[..., 0]
    grey2 = to_bgr(image2)[..., 0]
    src = torch.from_numpy(grey1.astype(np.float32))[None, None]
    warped = warp_image(src, torch.from_numpy(np.asarray(homography, dtype=np.float64)),
                        out_shape=grey2.shape)[0, 0].numpy()
    warped = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    overlay = np.stack([warped, grey2, warped], axis=-1)
    return side_by_side([grey1, grey2, overlay])


def add_title(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """A white strip with `text` above the image."""
    body = to_bgr(image)
    strip = np.full((height, body.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, body], axis=0)


def overlay_images(images: torch.Tensor, labels: torch.Tensor, predictions: list) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB: the image with labels in red and predictions in green.

    images: (N, 1, H, W) in [0, 1]; labels: (N, 1, H, W) binary; predictions: N arrays (K, 2) x, y.
    """
    out = []
    for image, lab, pred in zip(images, labels, predictions):
        gt = torch.nonzero(lab[0] > 0.5).flip(-1).cpu().numpy()
        canvas = draw_keypoints(image[0].detach().float().cpu().numpy(), gt, RED, radius=1)
        canvas = draw_keypoints(canvas, pred, GREEN, radius=1)
        out.append(canvas[..., ::-1])  # BGR -> RGB
    return np.stack(out)


def log_detections(writer, tag: str, step: int, images: torch.Tensor, labels: torch.Tensor, predictions: list,
                   heatmap: torch.Tensor) -> None:
    """Tensorboard images `<tag>-labels_vs_predictions` (`overlay_images`) and `<tag>-heatmap`.

    writer: a tensorboard SummaryWriter. images, labels: (N, 1, H, W); predictions: N arrays (K, 2) x, y;
    heatmap: (N, H, W) probabilities."""
    writer.add_images(f"{tag}-labels_vs_predictions", overlay_images(images, labels, predictions), step,
                      dataformats="NHWC")
    writer.add_images(f"{tag}-heatmap", heatmap[:, None].clamp(0, 1).cpu(), step, dataformats="NCHW")
