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


def nms(heatmap: torch.Tensor, radius: int, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, exactly as MagicLeap's `nms_fast`, as batched tensor code.

    heatmap: (B, H, W). Candidates are the pixels with score >= threshold. Visiting candidates from the
    highest score down, a candidate is kept unless a kept one lies within Chebyshev distance `radius`
    ((2r+1) x (2r+1) window); ties are visited in raster order. radius 0 keeps every candidate.
    Returns a (B, H, W) bool mask of kept pixels.

    Algorithm: a candidate that is the highest undecided one within its window is kept by the greedy
    order (every higher candidate near it is already decided and none of them was kept, else it would
    have been suppressed); kept points then suppress their windows. Repeat with the candidates still
    undecided (real heatmaps need 2-4 rounds, most candidates are decided in the first). Priorities are
    the integer ranks of the visiting order, so ties need no float tricks. A round reads each undecided
    candidate's window through a strided (B, H, W, S, S) view of the padded maps (no (K, S) index is
    built); a first round with more window reads than map pixels takes a sliding maximum of the map.
    """
    keep = torch.zeros_like(heatmap, dtype=torch.bool)
    keep[nms_points(heatmap, radius, threshold)] = True
    return keep


def nms_points(heatmap: torch.Tensor, radius: int, threshold: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points `nms` keeps, as (batch index, y, x), each (N,) long, in raster order per image."""
    bi, ys, xs = torch.nonzero(heatmap >= threshold, as_tuple=True)  # raster order within each image
    if radius <= 0:
        return bi, ys, xs
    b, h, w = heatmap.shape
    side, hp, wp = 2 * radius + 1, h + 2 * radius, w + 2 * radius
    order = torch.sort(heatmap[bi, ys, xs], descending=True, stable=True).indices
    priority = torch.empty(len(bi), dtype=torch.int32, device=heatmap.device)  # K (first visited) .. 1
    priority[order] = torch.arange(len(bi), 0, -1, dtype=torch.int32, device=heatmap.device)
    priority_map = heatmap.new_zeros((b, hp, wp), dtype=torch.int32)  # 0: no undecided candidate
    priority_map[bi, ys + radius, xs + radius] = priority
    suppressed = heatmap.new_zeros((b, hp, wp), dtype=torch.bool)
    windows = (b, h, w, side, side), (hp * wp, wp, 1, wp, 1)  # window of pixel (y, x) in a padded map
    priority_windows, suppressed_windows = priority_map.as_strided(*windows), suppressed.as_strided(*windows)
    undecided, kept = torch.arange(len(bi), device=heatmap.device), []
    # First round with many candidates: one sliding maximum over the map costs less than their windows.
    dense = len(bi) * side * side > priority_map.numel()
    while len(undecided):
        ub, uy, ux = bi[undecided], ys[undecided], xs[undecided]
        if dense:
            best, dense = _sliding_max(_sliding_max(priority_map, side, 2), side, 1)[ub, uy, ux], False
        else:
            best = priority_windows[ub, uy, ux].flatten(1).amax(dim=1)
        new = priority[undecided] == best
        kept.append(undecided[new])
        suppressed_windows[ub[new], uy[new], ux[new]] = True
        decided = suppressed[ub, uy + radius, ux + radius]  # kept points are in their own window
        priority_map[ub[decided], uy[decided] + radius, ux[decided] + radius] = 0
        undecided = undecided[~decided]
    kept = torch.sort(torch.cat(kept)).values if kept else undecided
    return bi[kept], ys[kept], xs[kept]


def _sliding_max(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Maximum over every window of `size` consecutive elements along `dim` (length n -> n - size + 1),
    by doubling: log2(size) elementwise maxima instead of `size`."""
    span = 1
    while span < size:
        step = min(span, size - span)  # windows of span -> span + step, never beyond size
        n = x.shape[dim] - step
        x, span = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, step, n)), span + step
    return x


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
    b_idx, ys, xs = nms_points(heatmap, nms_radius, threshold)
    if border > 0:  # after NMS, as `remove_borders` on the mask: points near the edge still suppress
        inside = (xs >= border) & (xs < heatmap.shape[2] - border) & (ys >= border) & (ys < heatmap.shape[1] - border)
        b_idx, ys, xs = b_idx[inside], ys[inside], xs[inside]
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


DESCRIPTOR_SAMPLING = ("exact", "superglue")


def sample_descriptors(descriptors: torch.Tensor, keypoints: torch.Tensor, cell: int = CELL,
                       mode: str = "exact") -> torch.Tensor:
    """Bilinearly interpolate a coarse descriptor map at pixel positions and L2-normalise.

    descriptors: (B, D, Hc, Wc). keypoints: (B, N, 2) x, y pixels (sub-pixel allowed).
    Returns (B, N, D) float32 unit vectors.

    mode 'exact': the descriptor of cell (i, j) describes the cell's centre, pixel (8j + 3.5, 8i + 3.5),
      so a point x reads the map at column u = (x - 3.5) / 8 (rows alike). Points beyond the outer cell
      centres take the border value. This project's training and evaluation use it.
    mode 'superglue': the sampling of MagicLeap's SuperGlue code, which LightGlue and hloc keep so that
      the matchers trained on it get what they expect: the map is read at
      u = (x - 3.5) / (8 Wc - 4.5) * (Wc - 1), i.e. column 0 at x = 3.5 but column Wc - 1 at x = 8 Wc - 1,
      up to 3.5 px up-left of the cell centre at the far edge; outside the map it blends with zeros.
      MagicLeap's published weights and the matchers trained on their features (SuperGlue, LightGlue)
      saw descriptors sampled this way.
    """
    if mode not in DESCRIPTOR_SAMPLING:
        raise ValueError(f"descriptor sampling is {mode!r}; expected one of {DESCRIPTOR_SAMPLING}")
    b, d, hc, wc = descriptors.shape
    if keypoints.shape[1] == 0:
        return descriptors.new_zeros((b, 0, d), dtype=torch.float32)
    points = keypoints.float() - (cell - 1) / 2
    if mode == "exact":
        grid = 2 * (points / cell) / points.new_tensor([max(wc - 1, 1), max(hc - 1, 1)]) - 1
        padding = "border"
    else:
        grid = 2 * points / points.new_tensor([wc * cell - cell / 2 - 0.5, hc * cell - cell / 2 - 0.5]) - 1
        padding = "zeros"
    # align_corners=True: grid -1 and 1 are the centres of the outer cells.
    sampled = F.grid_sample(descriptors.float(), grid[:, None], mode="bilinear", padding_mode=padding,
                            align_corners=True)  # (B, D, 1, N)
    return F.normalize(sampled[:, :, 0].transpose(1, 2), dim=-1)
