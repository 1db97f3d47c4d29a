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
