"""Keypoint post-processing, shared by training, export, adaptation and evaluation.

heatmap from logits -> threshold + NMS -> border removal -> top-k -> sub-pixel refinement, and
descriptor sampling at the resulting points. All functions are batched tensor code that runs on the
device of their inputs. Points follow the project convention of `utils.geometry`: (x, y) pixels,
pixel centres at integers.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

CELL = 8  # the network's cell size: one logit vector per 8 x 8 pixels


def logits_to_heatmap(semi: torch.Tensor) -> torch.Tensor:
    """Detector logits (B, 65, Hc, Wc) -> keypoint probability (B, H, W), H = 8 Hc.

    Softmax over the 65 channels in fp32, drop the dustbin (channel 64), then depth-to-space: channel
    k of cell (i, j) becomes pixel (row 8i + k // 8, column 8j + k % 8).
    """
    prob = torch.softmax(semi.float(), dim=1)[:, :-1]
    return F.pixel_shuffle(prob, CELL)[:, 0]


def heatmap_to_cells(heatmap: torch.Tensor) -> torch.Tensor:
    """Space-to-depth, the inverse of the depth-to-space above: (B, H, W) -> (B, 64, H/8, W/8)."""
    return F.pixel_unshuffle(heatmap[:, None], CELL)


def _priority(heatmap: torch.Tensor) -> torch.Tensor:
    """A float64 map with the order of the scores in which ties are broken by raster index (the lower
    index first), so that every candidate has a distinct priority.

    Distinct float32 scores differ by at least 2^-24 of their value; the tie-break term is at most
    2^-26 of it, so it never reorders distinct scores, and it stays resolvable in float64 for images
    of up to 2^26 pixels.
    """
    b, h, w = heatmap.shape
    index = torch.arange(h * w, device=heatmap.device, dtype=torch.float64).reshape(1, h, w)
    return heatmap.double() * (1 + 2.0 ** -26 * (1 - index / (h * w)))


def nms(heatmap: torch.Tensor, radius: int, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, exactly as MagicLeap's `nms_fast`, as batched tensor code.

    heatmap: (B, H, W). Candidates are the pixels with score >= threshold. Visiting candidates from the
    highest score down, a candidate is kept unless a kept one lies within Chebyshev distance `radius`
    ((2r+1) x (2r+1) window); ties are visited in raster order. radius 0 keeps every candidate.
    Returns a (B, H, W) bool mask of kept pixels.

    Algorithm: a candidate that is the highest undecided one within its window is kept by the greedy
    order (every higher candidate near it is already decided and none of them was kept, else it would
    have been suppressed); kept points then suppress their windows. Repeat until nothing is undecided.
    Work is done on the candidates only: each gathers its window from padded flat maps, so the cost is
    O(candidates x window) per round, and real heatmaps need 2-4 rounds.
    """
    candidates = heatmap >= threshold
    if radius <= 0:
        return candidates
    b, h, w = heatmap.shape
    hp, wp = h + 2 * radius, w + 2 * radius
    bi, ys, xs = torch.nonzero(candidates, as_tuple=True)
    position = bi * (hp * wp) + (ys + radius) * wp + (xs + radius)  # (K,) in the padded flat maps
    span = torch.arange(-radius, radius + 1, device=heatmap.device)
    window = (span[:, None] * wp + span[None, :]).reshape(-1)  # (S,) flat offsets of the window
    neighbours = position[:, None] + window[None, :]  # (K, S)
    priority = _priority(heatmap)[bi, ys, xs]
    priority_map = torch.full((b * hp * wp,), float("-inf"), dtype=priority.dtype, device=heatmap.device)
    priority_map[position] = priority
    kept_map = torch.zeros(b * hp * wp, dtype=torch.bool, device=heatmap.device)
    undecided = torch.ones_like(position, dtype=torch.bool)
    while True:
        new_keep = undecided & (priority >= priority_map[neighbours].amax(dim=1))
        if not bool(new_keep.any()):
            break
        kept_map[position[new_keep]] = True
        undecided &= ~kept_map[neighbours].any(dim=1)
        priority_map[position[~undecided]] = float("-inf")
    keep = torch.zeros(b * h * w, dtype=torch.bool, device=heatmap.device)
    keep[(bi * h + ys) * w + xs] = kept_map[position]
    return keep.reshape(b, h, w)


def remove_borders(mask: torch.Tensor, border: int) -> torch.Tensor:
    """Clear a (B, H, W) mask within `border` pixels of the edge: keeps x in [border, W - 1 - border]."""
    if border <= 0:
        return mask
    out = torch.zeros_like(mask)
    out[:, border:-border, border:-border] = mask[:, border:-border, border:-border]
    return out


def soft_argmax_refine(heatmap: torch.Tensor, batch_index: torch.Tensor, points: torch.Tensor,
                       patch_size: int = 5) -> torch.Tensor:
    """Sub-pixel refinement: each point moves to the score-weighted centroid of the heatmap patch
    (patch_size x patch_size, zero outside the image) centred on it.

    This is what the reference's log + spatial soft-argmax computes: softmax(log p) = p / sum(p).
    heatmap: (B, H, W). batch_index: (N,) long. points: (N, 2) integer-valued x, y.
    Returns (N, 2) float32 refined x, y.
    """
    if points.numel() == 0:
        return points.float()
    r = patch_size // 2
    padded = F.pad(heatmap.float(), [r, r, r, r])
    offsets = torch.arange(-r, r + 1, device=heatmap.device)
    xs = points[:, 0].long()[:, None, None] + offsets[None, None, :] + r  # (N, 1, P)
    ys = points[:, 1].long()[:, None, None] + offsets[None, :, None] + r  # (N, P, 1)
    patches = padded[batch_index[:, None, None], ys, xs].clamp_min(0)  # (N, P, P)
    total = patches.sum(dim=(1, 2)).clamp_min(1e-12)
    dx = (patches.sum(dim=1) * offsets).sum(dim=1) / total
    dy = (patches.sum(dim=2) * offsets).sum(dim=1) / total
    return points.float() + torch.stack([dx, dy], dim=-1)


def extract_keypoints(heatmap: torch.Tensor, threshold: float, nms_radius: int, border: int = 4,
                      top_k: int = 0, subpixel: bool = False, patch_size: int = 5
                      ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Keypoints of each heatmap in a batch.

    heatmap: (B, H, W). threshold: minimum score (>=). nms_radius: see `nms`. border: pixels removed
    at the edges after NMS. top_k: keep the k best (0: all). subpixel: soft-argmax refinement.
    Returns a list of B pairs (keypoints (N, 2) float32 x, y; scores (N,) float32), sorted by
    decreasing score.
    """
    mask = remove_borders(nms(heatmap, nms_radius, threshold), border)
    b_idx, ys, xs = torch.nonzero(mask, as_tuple=True)
    scores = heatmap[b_idx, ys, xs].float()
    # Order by image, then by decreasing score (two stable sorts).
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(b_idx[order], stable=True).indices]
    b_idx, ys, xs, scores = b_idx[order], ys[order], xs[order], scores[order]
    counts = torch.bincount(b_idx, minlength=heatmap.shape[0]).tolist()
    if top_k and top_k > 0:
        starts = torch.cumsum(torch.tensor([0] + counts[:-1], device=heatmap.device), 0)
        rank = torch.arange(len(b_idx), device=heatmap.device) - starts[b_idx]
        kept = rank < top_k
        b_idx, ys, xs, scores = b_idx[kept], ys[kept], xs[kept], scores[kept]
        counts = [min(c, top_k) for c in counts]
    points = torch.stack([xs, ys], dim=-1)
    points = soft_argmax_refine(heatmap, b_idx, points, patch_size) if subpixel else points.float()
    return list(zip(points.split(counts), scores.split(counts)))


def sample_descriptors(descriptors: torch.Tensor, keypoints: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Bilinearly interpolate a coarse descriptor map at pixel positions and L2-normalise.

    descriptors: (B, D, Hc, Wc); the descriptor of cell (i, j) describes the cell's centre, pixel
    (8j + 3.5, 8i + 3.5). keypoints: (B, N, 2) x, y pixels (sub-pixel allowed).
    Returns (B, N, D) float32 unit vectors. Points beyond the outer cell centres take the border value.
    """
    b, d, hc, wc = descriptors.shape
    if keypoints.shape[1] == 0:
        return descriptors.new_zeros((b, 0, d), dtype=torch.float32)
    centre = (cell - 1) / 2
    u = (keypoints[..., 0].float() - centre) / cell
    v = (keypoints[..., 1].float() - centre) / cell
    grid = torch.stack([2 * u / max(wc - 1, 1) - 1, 2 * v / max(hc - 1, 1) - 1], dim=-1)
    sampled = F.grid_sample(descriptors.float(), grid[:, None], mode="bilinear", padding_mode="border",
                            align_corners=True)  # (B, D, 1, N)
    return F.normalize(sampled[:, :, 0].transpose(1, 2), dim=-1)
