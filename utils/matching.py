"""Descriptor matching."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def descriptor_distances(desc1: torch.Tensor, desc2: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) between rows of desc1 (N, D) and desc2 (M, D), in float64.

    For unit vectors this is sqrt(2 - 2 <d1, d2>), MagicLeap's distance.
    """
    a, b = desc1.double(), desc2.double()
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return sq.clamp_min(0).sqrt()


def mutual_nearest_neighbours(desc1: torch.Tensor, desc2: torch.Tensor, max_distance: Optional[float] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest-neighbour matches (cross-check), optionally with a distance below `max_distance`.

    desc1: (N, D), desc2: (M, D). Returns (idx1 (K,), idx2 (K,), distance (K,) float64), in the order
    of idx1. The same matches as OpenCV's BFMatcher(NORM_L2, crossCheck=True) and, with a threshold,
    MagicLeap's `nn_match_two_way`.
    """
    empty = torch.zeros(0, dtype=torch.long, device=desc1.device)
    if desc1.shape[0] == 0 or desc2.shape[0] == 0:
        return empty, empty, torch.zeros(0, dtype=torch.float64, device=desc1.device)
    dist = descriptor_distances(desc1, desc2)
    nn12 = dist.argmin(dim=1)
    nn21 = dist.argmin(dim=0)
    idx1 = torch.arange(desc1.shape[0], device=desc1.device)
    keep = nn21[nn12] == idx1
    best = dist[idx1, nn12]
    if max_distance is not None:
        keep &= best < max_distance
    return idx1[keep], nn12[keep], best[keep]


def _nearest(sim: torch.Tensor, max_distance: Optional[float], ratio: Optional[float]
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's best column of a cosine-similarity matrix (B, N, M) of unit vectors, -1 where it fails
    a threshold: squared distance 2 - 2 cos <= max_distance^2 and <= ratio^2 times the second best's."""
    k = 1 if ratio is None else 2
    best_sim, best = sim.topk(k, dim=-1)
    sq_dist = 2 * (1 - best_sim)
    keep = torch.isfinite(best_sim[..., 0])
    if max_distance is not None:
        keep &= sq_dist[..., 0] <= max_distance ** 2
    if k == 2:
        keep &= sq_dist[..., 0] <= ratio ** 2 * sq_dist[..., 1]
    return torch.where(keep, best[..., 0], -1), torch.where(keep, best_sim[..., 0], -1.0)


def nearest_neighbour_matches(desc0: torch.Tensor, desc1: torch.Tensor, mask0: Optional[torch.Tensor] = None,
                              mask1: Optional[torch.Tensor] = None, max_distance: Optional[float] = None,
                              ratio: Optional[float] = None, mutual: bool = True
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched nearest-neighbour matching of unit descriptors with distance, ratio and mutual checks.

    desc0: (B, N, D), desc1: (B, M, D) unit vectors; mask0 (B, N), mask1 (B, M) bool, False for padding
    (never matched). A point of image 0 takes its nearest neighbour j in image 1 if the Euclidean
    distance is <= max_distance and <= ratio times the second nearest (skipped when either image has a
    single point, as hloc does); with `mutual`, j must also pick it back under the same tests. None disables a test.
    Returns (matches0 (B, N) long, index in image 1 or -1; scores0 (B, N) float32, (1 + cos) / 2 of
    the match, 0 where unmatched): hloc's `matches0` / `matching_scores0`.
    """
    b, n, m = desc0.shape[0], desc0.shape[1], desc1.shape[1]
    if n == 0 or m == 0:
        return (torch.full((b, n), -1, dtype=torch.long, device=desc0.device),
                torch.zeros(b, n, device=desc0.device))
    sim = torch.einsum("bnd,bmd->bnm", desc0.float(), desc1.float())
    if mask0 is not None:
        sim = sim.masked_fill(~mask0[:, :, None], float("-inf"))
    if mask1 is not None:
        sim = sim.masked_fill(~mask1[:, None, :], float("-inf"))
    ratio = ratio if min(n, m) > 1 else None
    matches0, sim0 = _nearest(sim, max_distance, ratio)
    if mutual:
        matches1, _ = _nearest(sim.transpose(1, 2), max_distance, ratio)
        back = matches1.gather(1, matches0.clamp_min(0))
        matches0 = torch.where((matches0 >= 0) & (back == torch.arange(n, device=desc0.device)), matches0, -1)
    scores0 = torch.where(matches0 >= 0, (sim0 + 1) / 2, 0.0)
    return matches0, scores0
