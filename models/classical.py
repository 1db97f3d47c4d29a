"""Classical baseline: OpenCV SIFT, as the reference's export_classical.py: SIFT with a
very low contrast threshold (1e-5, so that flat images still give points) and Lowe's ratio test at 0.8."""
from __future__ import annotations

import cv2
import numpy as np


def sift_features(image: np.ndarray, contrast_threshold: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints and descriptors of a grey image.

    image: (H, W) float in [0, 1] (converted to uint8 as the reference) or uint8.
    Returns (keypoints (N, 2) float64 sub-pixel x, y; descriptors (N, 128) float32).
    """
    if image.dtype != np.uint8:
        image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    sift = cv2.SIFT_create(contrastThreshold=contrast_threshold)
    keypoints, descriptors = sift.detectAndCompute(image, None)
    points = np.array([kp.pt for kp in keypoints], dtype=np.float64).reshape(-1, 2)
    if descriptors is None:
        descriptors = np.zeros((0, 128), dtype=np.float32)
    return points, descriptors.astype(np.float32)


def ratio_test_matches(points1, desc1, points2, desc2, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force L2 2-NN matches with Lowe's ratio test.

    Returns (good (M, 6), all (K, 6)) rows [x1, y1, x2, y2, distance, ratio], where `all` holds every
    first-neighbour match and `good` those with ratio < `ratio`.
    """
    if len(desc1) < 1 or len(desc2) < 2:
        empty = np.zeros((0, 6))
        return empty, empty
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc1, desc2, k=2)
    rows = []
    for pair in knn:
        if len(pair) < 2:
            continue
        best, second = pair
        r = best.distance / max(second.distance, 1e-12)
        rows.append([*points1[best.queryIdx], *points2[best.trainIdx], best.distance, r])
    every = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return every[every[:, 5] < ratio], every
