"""HPatches metrics, as the reference's evaluation scripts define them: repeatability, localisation error, homography
estimation correctness, matching score and nearest-neighbour mAP.

Pure numpy functions on one image pair. Points are (x, y) pixels in the project's convention
(utils/geometry.py); `shape` is the (H, W) of the images; `homography` is the (3, 3) pixel homography
mapping image 1 to image 2. A point is *visible* in an image when it falls in [0, W) x [0, H) (the
reference's filter). Two metrics had buggy definitions in the reference (the matching score used
(y, x)-swapped points; the NN mAP labelled matches by RANSAC inliers); the correct ones are the plain
functions here and the reference's are the `*_compat` ones, which keep its published table comparable.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch

from utils.geometry import warp_points, warp_points_np
from utils.keypoints import extract_keypoints, logits_to_heatmap, sample_descriptors
from utils.matching import mutual_nearest_neighbours

HOMOGRAPHY_THRESHOLDS = (1, 3, 5, 10, 20, 50)
AUC_THRESHOLDS = (1, 3, 5)  # pixels of mean corner error, as LightGlue and glue-factory report HPatches
RANSAC_REPROJ_THRESHOLD = 3.0  # OpenCV's default, used by the reference
NN_MAP_MAX_DISTANCE = 1.2  # descriptor distance below which NN matches enter the mAP (reference)


def visible_mask(points: np.ndarray, homography: np.ndarray, shape) -> np.ndarray:
    """(N,) bool: the points (N, 2+) mapped by `homography` fall in [0, W) x [0, H) for shape (H, W)."""
    h, w = shape
    warped = warp_points_np(points[:, :2], homography)
    return (warped[:, 0] >= 0) & (warped[:, 0] < w) & (warped[:, 1] >= 0) & (warped[:, 1] < h)


def select_top_k(points: np.ndarray, k: int) -> np.ndarray:
    """The k highest-score points of (N, 3) [x, y, score] as (min(N, k), 2); points without a score
    column, (N, 2), are all kept (SIFT exports have none)."""
    if points.shape[1] < 3:
        return points[:, :2]
    order = np.argsort(-points[:, 2], kind="stable")
    return points[order[:k], :2]


class Repeatability(NamedTuple):
    repeatability: float
    localization_error: float  # -1 when no point has a correspondence (reference)
    n1: int  # points of image 1 visible in image 2 (after top-k)
    n2: int  # points of image 2 visible in image 1 (after top-k)


def repeatability(points1: np.ndarray, points2: np.ndarray, homography: np.ndarray, shape,
                  keep_k_points: int = 1000, distance_thresh: float = 3) -> Repeatability:
    """Repeatability and localisation error of two detections (the reference's compute_repeatability).

    points1: (N1, 2|3) and points2: (N2, 2|3), x, y[, score]. Each set is restricted to the points
    visible in the other image, then to its `keep_k_points` best by score; points1 are mapped into
    image 2. A point is repeated when its nearest neighbour in the other set is within
    `distance_thresh` (<=). repeatability = (#repeated1 + #repeated2) / (N1 + N2), 0 when nothing is
    repeated (empty pairs count as 0); localisation error = mean nearest-neighbour distance of the
    repeated points, -1 when there are none.
    """
    kept2 = select_top_k(points2[visible_mask(points2, np.linalg.inv(homography), shape)], keep_k_points)
    warped1 = points1.astype(np.float64).copy()
    warped1[:, :2] = warp_points_np(points1[:, :2], homography)
    h, w = shape
    inside = (warped1[:, 0] >= 0) & (warped1[:, 0] < w) & (warped1[:, 1] >= 0) & (warped1[:, 1] < h)
    kept1 = select_top_k(warped1[inside], keep_k_points)
    n1, n2 = len(kept1), len(kept2)
    if n1 == 0 or n2 == 0:
        return Repeatability(0.0, -1.0, n1, n2)
    dist = np.linalg.norm(kept1[:, None, :] - kept2[None, :, :], axis=-1)
    min1, min2 = dist.min(axis=1), dist.min(axis=0)
    close1, close2 = min1[min1 <= distance_thresh], min2[min2 <= distance_thresh]
    count = len(close1) + len(close2)
    if count == 0:
        return Repeatability(0.0, -1.0, n1, n2)
    return Repeatability(count / (n1 + n2), float((close1.sum() + close2.sum()) / count), n1, n2)


class Matches(NamedTuple):
    idx1: np.ndarray  # (M,) int, rows of points1 / desc1
    idx2: np.ndarray  # (M,) int, rows of points2 / desc2
    distance: np.ndarray  # (M,) float64 descriptor distances
    points: np.ndarray  # (M, 4) float64 [x1, y1, x2, y2]


def mutual_nn_matches(points1: np.ndarray, desc1: np.ndarray, points2: np.ndarray, desc2: np.ndarray,
                      max_distance: Optional[float] = None) -> Matches:
    """Mutual nearest-neighbour matches of the descriptors (N1, D) and (N2, D), optionally with a
    distance below `max_distance`; in the order of idx1, like OpenCV's cross-check BFMatcher."""
    idx1, idx2, dist = mutual_nearest_neighbours(torch.from_numpy(np.ascontiguousarray(desc1)),
                                                 torch.from_numpy(np.ascontiguousarray(desc2)), max_distance)
    idx1, idx2 = idx1.numpy(), idx2.numpy()
    points = np.concatenate([points1[idx1, :2], points2[idx2, :2]], axis=1).astype(np.float64)
    return Matches(idx1, idx2, dist.numpy(), points.reshape(-1, 4))


def estimate_homography(src: np.ndarray, dst: np.ndarray, reproj_thresh: float = RANSAC_REPROJ_THRESHOLD):
    """RANSAC homography src (M, 2) -> dst (M, 2) with OpenCV, seeded so that a rerun gives the same
    result. Returns (H (3, 3) or None, inliers (M,) bool); None (no inliers) with fewer than 4
    matches or when RANSAC finds no model."""
    m = len(src)
    if m < 4:
        return None, np.zeros(m, dtype=bool)
    cv2.setRNGSeed(0)
    h, mask = cv2.findHomography(np.asarray(src, np.float64), np.asarray(dst, np.float64), cv2.RANSAC,
                                 reproj_thresh)
    if h is None or h.shape != (3, 3) or mask is None:
        return None, np.zeros(m, dtype=bool)
    return h, mask.ravel().astype(bool)


def corner_error(h_estimated: np.ndarray, h_true: np.ndarray, shape) -> float:
    """Mean distance between the 4 image corners (pixel centres (0, 0), (0, H-1), (W-1, 0),
    (W-1, H-1)) mapped by the estimated and by the true homography (the reference's compute_homography)."""
    h, w = shape
    corners = np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], dtype=np.float64)
    diff = warp_points_np(corners, h_estimated) - warp_points_np(corners, h_true)
    return float(np.mean(np.linalg.norm(diff, axis=1)))


def homography_correctness(mean_corner_error: float, thresholds: Sequence[float] = HOMOGRAPHY_THRESHOLDS
                           ) -> np.ndarray:
    """(len(thresholds),) bool: corner error <= eps for each eps; a failed estimate (nan/inf error) is
    incorrect at every eps."""
    err = float(mean_corner_error)
    return np.array([np.isfinite(err) and err <= eps for eps in thresholds], dtype=bool)


def homography_auc(corner_errors: Sequence[float], thresholds: Sequence[float] = AUC_THRESHOLDS
                   ) -> Optional[dict]:
    """Area under the recall curve of the mean corner error, up to each threshold t, divided by t.

    The recall curve joins (0, 0) and (e_i, i / n) for the n sorted errors by straight lines and stays
    flat after the last error below t: AUC@t = (1 / t) * integral over [0, t]. A failed estimate (nan
    or inf) counts as an infinite error: it stays in n and is never recalled. This is the AUC of
    LightGlue's and glue-factory's HPatches tables. Returns {str(t): AUC in [0, 1]}, None without pairs.
    """
    errors = np.sort(np.nan_to_num(np.asarray(corner_errors, dtype=np.float64), nan=np.inf))
    n = len(errors)
    if n == 0:
        return None
    out = {}
    for t in thresholds:
        k = int(np.sum(errors < t))
        x = np.r_[0.0, errors[:k], t]
        y = np.r_[0.0, np.arange(1, k + 1) / n, k / n]
        out[str(t)] = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / t)
    return out


def correct_matches(matches: np.ndarray, homography: np.ndarray, distance_thresh: float = 3) -> np.ndarray:
    """(M,) bool: the match [x1, y1, x2, y2] is right under the true homography, i.e.
    ||H p1 - p2|| <= distance_thresh."""
    if len(matches) == 0:
        return np.zeros(0, dtype=bool)
    err = np.linalg.norm(warp_points_np(matches[:, :2], homography) - matches[:, 2:4], axis=1)
    return err <= distance_thresh


def matching_score(points1: np.ndarray, points2: np.ndarray, matches: Matches, homography: np.ndarray, shape,
                   distance_thresh: float = 3) -> float:
    """Fraction of the keypoints of the shared view that the matcher matches correctly.

    2 * #matches correct under the true homography (`correct_matches`) between a point of image 1
    visible in image 2 and a point of image 2 visible in image 1, divided by (#points1 visible in
    image 2 + #points2 visible in image 1); 0 when no point is visible. Matches are one-to-one, so
    the score lies in [0, 1].
    """
    vis1 = visible_mask(points1, homography, shape)
    vis2 = visible_mask(points2, np.linalg.inv(homography), shape)
    denominator = int(vis1.sum() + vis2.sum())
    if denominator == 0:
        return 0.0
    good = correct_matches(matches.points, homography, distance_thresh) & vis1[matches.idx1] & vis2[matches.idx2]
    return 2.0 * int(good.sum()) / denominator


def matching_score_compat(n_inliers: int, points1: np.ndarray, points2: np.ndarray, homography: np.ndarray,
                          shape) -> float:
    """The reference's matching score, bugs included.

    2 * n_inliers (RANSAC inliers of the cross-check matches) / (N1 + N2_back), where N1 counts every
    point of image 1 and N2_back the points of image 2 that, (y, x)-swapped, truncated to integers
    and mapped by H^-1 in float32, land in [0, W-1] x [0, H-1].
    """
    h, w = shape
    swapped = np.trunc(points2[:, [1, 0]]).astype(np.float32)
    back = warp_points(torch.from_numpy(swapped),
                       torch.from_numpy(np.linalg.inv(homography).astype(np.float32))).numpy()
    n_back = int(np.sum((back[:, 0] >= 0) & (back[:, 0] <= w - 1) & (back[:, 1] >= 0) & (back[:, 1] <= h - 1)))
    denominator = len(points1) + n_back
    return 2.0 * n_inliers / denominator if denominator else 0.0


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of a ranking, with the semantics of sklearn.metrics.average_precision_score.

    labels: (M,) bool (positives), scores: (M,) float, higher first. Tied scores form one threshold:
    AP = sum over distinct score thresholds t (descending) of
    (recall(t) - recall(previous t)) * precision(t), where precision and recall count every item
    with score >= t. Returns 0.0 when there is no positive (the reference's convention).
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each threshold group
    tp = np.cumsum(labels)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * precision))


def nn_map(labels: np.ndarray, distances: np.ndarray) -> float:
    """AP of matches ranked by descriptor distance (closest first): the per-pair "NN mAP" term.

    labels: (M,) bool, distances: (M,). The score is max(distance) - distance, as the reference;
    0.0 without matches or without a positive label.
    """
    if len(distances) == 0:
        return 0.0
    distances = np.asarray(distances, dtype=np.float64)
    return average_precision(labels, distances.max() - distances)

# --------------------------------------------------------------------------------------------------
# Training-time metrics: detections against label maps and descriptor matches of warped pairs, on
# batched network outputs (the trainer's validation and tensorboard). The reference hard-coded NMS 4
# and threshold 0.015 for these; the defaults below are the same.
# --------------------------------------------------------------------------------------------------

EVAL_NMS_RADIUS = 4
EVAL_THRESHOLD = 0.015
EVAL_BORDER = 4
EVAL_MATCH_DISTANCE = 3.0
EVAL_MAP_MIN_SCORE = 0.001
EVAL_MATCH_TOP_K = 300  # keypoints per image for the descriptor metric


def match_detections(pred: np.ndarray, gt: np.ndarray, max_distance: float) -> np.ndarray:
    """Greedy one-to-one matching. pred: (N, 2) x, y sorted by decreasing score; gt: (M, 2) x, y.

    Returns (N,) bool: prediction i is correct when the nearest label not taken by a higher-scoring
    prediction lies within `max_distance` (Euclidean, pixels); that label is then taken.
    """
    correct = np.zeros(len(pred), dtype=bool)
    if len(pred) == 0 or len(gt) == 0:
        return correct
    dist = np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=-1)
    taken = np.zeros(len(gt), dtype=bool)
    for i in np.flatnonzero((dist <= max_distance).any(axis=1)):
        d = np.where(taken, np.inf, dist[i])
        j = int(np.argmin(d))
        if d[j] <= max_distance:
            correct[i] = taken[j] = True
    return correct


class DetectionMetrics:
    """Accumulates precision, recall and mAP of keypoint detections against label maps.

    Predictions are the NMS'd heatmap maxima (radius `nms_radius`, score >= `threshold`, `border`
    pixels removed, as the extractor); labels are the label-map pixels outside that border (and inside
    the valid mask). Matching is `match_detections` (greedy, one-to-one, by decreasing score, within
    `max_distance` px). precision = correct / predictions, recall = correct / labels, over everything
    accumulated. mAP ranks every NMS'd maximum with score >= `map_min_score` and is the area under that
    precision-recall curve with recall relative to all labels.
    """

    def __init__(self, threshold: float = EVAL_THRESHOLD, nms_radius: int = EVAL_NMS_RADIUS,
                 border: int = EVAL_BORDER, max_distance: float = EVAL_MATCH_DISTANCE,
                 map_min_score: float = EVAL_MAP_MIN_SCORE):
        self.threshold, self.nms_radius, self.border = threshold, nms_radius, border
        self.max_distance, self.map_min_score = max_distance, min(map_min_score, threshold)
        self.scores: list = []
        self.correct: list = []
        self.n_labels = 0

    def update(self, heatmap: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> list:
        """heatmap: (B, H, W) probabilities; labels: (B, 1, H, W) binary; valid: (B, 1, H, W) 0/1 or None.

        Returns the B predicted keypoint arrays (N, 2) at the precision/recall threshold.
        """
        heatmap = heatmap.detach().float()
        labels = labels.detach().to(heatmap.device)[:, 0] > 0.5
        if valid is not None:
            inside = valid.detach().to(heatmap.device)[:, 0] > 0.5
            heatmap, labels = heatmap * inside, labels & inside
        h, w = labels.shape[-2:]
        labels[:, :self.border], labels[:, h - self.border:] = False, False
        labels[:, :, :self.border], labels[:, :, w - self.border:] = False, False
        # Greedy NMS visits higher scores first, so the maxima >= threshold are the same at any lower
        # threshold: one NMS serves both precision/recall and the mAP ranking.
        detections = extract_keypoints(heatmap, self.map_min_score, self.nms_radius, border=self.border)
        kept = []
        for (points, scores), lab in zip(detections, labels):
            gt = torch.nonzero(lab).flip(-1).float().cpu().numpy()  # (M, 2) x, y
            points, scores = points.cpu().numpy(), scores.cpu().numpy()
            self.correct.append(match_detections(points, gt, self.max_distance))
            self.scores.append(scores)
            self.n_labels += len(gt)
            kept.append(points[scores >= self.threshold])
        return kept

    def compute(self) -> dict:
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        correct = np.concatenate(self.correct) if self.correct else np.zeros(0, dtype=bool)
        at_threshold = scores >= self.threshold
        n_correct = int(correct[at_threshold].sum())
        n_pred = int(at_threshold.sum())
        # average_precision normalises recall by the positives in the ranking; rescale to all labels.
        ap = average_precision(correct, scores) * correct.sum() / self.n_labels if self.n_labels else 0.0
        return {
            "precision": n_correct / n_pred if n_pred else 0.0,
            "recall": n_correct / self.n_labels if self.n_labels else 0.0,
            "mAP": float(ap),
        }


class MatchingMetrics:
    """Accumulates the descriptor metric of image pairs: the `top_k` best predictions of the image and
    of the warped image, their descriptors, mutual nearest neighbours. `match_precision` is the share of
    those matches whose image point, moved by the pair's homography, lies within `max_distance` px of
    its match; `matches` the mean number of matches per pair."""

    def __init__(self, threshold: float = EVAL_THRESHOLD, nms_radius: int = EVAL_NMS_RADIUS, border: int = EVAL_BORDER,
                 top_k: int = EVAL_MATCH_TOP_K, max_distance: float = EVAL_MATCH_DISTANCE):
        self.threshold, self.nms_radius, self.border = threshold, nms_radius, border
        self.top_k, self.max_distance = top_k, max_distance
        self.correct = self.matches = self.pairs = 0

    def update(self, heatmap: torch.Tensor, desc: torch.Tensor, warped_heatmap: torch.Tensor,
               warped_desc: torch.Tensor, homographies: torch.Tensor) -> None:
        """heatmaps: (B, H, W); desc: (B, D, H/8, W/8); homographies: (B, 3, 3) pixel, image -> warped."""
        found = [extract_keypoints(h.detach().float(), self.threshold, self.nms_radius, self.border, self.top_k)
                 for h in (heatmap, warped_heatmap)]
        for b, ((p1, _), (p2, _)) in enumerate(zip(*found)):
            self.pairs += 1
            if len(p1) == 0 or len(p2) == 0:
                continue
            d1 = sample_descriptors(desc[b:b + 1].detach(), p1[None])[0]
            d2 = sample_descriptors(warped_desc[b:b + 1].detach(), p2[None])[0]
            i1, i2, _ = mutual_nearest_neighbours(d1, d2)
            moved = warp_points(p1[i1].double(), homographies[b].to(p1.device, torch.float64))
            self.correct += int(((moved - p2[i2].double()).norm(dim=-1) <= self.max_distance).sum())
            self.matches += len(i1)

    def compute(self) -> dict:
        return {"match_precision": self.correct / self.matches if self.matches else 0.0,
                "matches": self.matches / self.pairs if self.pairs else 0.0}


class ValidationMetrics:
    """Validation over several batches: the mean of each loss term, `DetectionMetrics` and, for batches
    with a warped pair, `MatchingMetrics`."""

    def __init__(self):
        self.detection, self.matching = DetectionMetrics(), MatchingMetrics()
        self.sums: dict = {}
        self.batches = 0

    def update(self, out: dict, batch: dict, losses: dict) -> tuple:
        """out: fp32 network outputs of torch.cat([image, warped_img]) (or of image alone); batch: samples
        with 'image', 'labels_2D' and optionally 'valid_mask', 'warped_img', 'homographies'; losses:
        {name: scalar}. Returns the image heatmaps (B, H, W) and the B predicted keypoint arrays."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.batches += 1
        b = batch["image"].shape[0]
        heatmap = logits_to_heatmap(out["semi"][:b])
        predictions = self.detection.update(heatmap, batch["labels_2D"], batch.get("valid_mask"))
        if "warped_img" in batch:
            self.matching.update(heatmap, out["desc"][:b], logits_to_heatmap(out["semi"][b:]), out["desc"][b:],
                                 batch["homographies"])
        return heatmap, predictions

    def compute(self) -> dict:
        result = {key: value / self.batches for key, value in self.sums.items()}
        result.update(self.detection.compute())
        if self.matching.pairs:
            result.update(self.matching.compute())
        return result
