"""Homography adaptation: a detector's heatmap averaged over random homographic views of the image.

For each image, `num` homographies A_i (pixel, original -> warped; A_0 = identity) are sampled. The
warped images W_i = warp(I, A_i) go through the network in chunks of `chunk` warps, giving heatmaps P_i
in the warped frames and valid masks V_i (the warped pixels that see the image, eroded by
`valid_border_margin`). Both are brought back to the original frame with A_i^-1 and aggregated:

  mean / sum:  P(x) = sum_i (P_i V_i)(A_i x) / sum_i V_i(A_i x)      (masked mean, as the reference)
  max:         P(x) = max_i (P_i V_i)(A_i x)

'sum' is the name the reference's configs (and the TensorFlow SuperPoint that defined the key) use for
this masked mean: there the sum of the probabilities is divided by the counts; 'mean' says the same
thing plainly. `filter_counts` > 0 zeroes pixels seen by fewer than that many views.

The homographies default to those of the label exports (the reference's magicpoint_coco_export.yaml:
a patch of 0.85 of the image, scaling and perspective amplitudes 0.2, artifacts allowed), for every
caller, the HPatches export's detector adaptation included. The sampler's own defaults (TensorFlow
SuperPoint's: a patch of half the image, amplitudes 0.1) zoom every view 2x on the image centre and rarely
cover its borders; with them a MagicPoint's HPatches repeatability did not rise with the number of
views (0.625 with one view, 0.597 with 10, 0.650 with 100 at 240x320 on the shared pairs), while with
these it rose to 0.709 (benchmarks/adaptation_curve.py, README).

Unlike the reference, the network is in eval mode (BatchNorm running statistics, not the statistics
of the warp batch), `aggregation`, `filter_counts` and the erosion are honoured, and everything stays
on the device of the inputs. Which network runs, at which precision and memory layout, is the
caller's `heatmap_fn` (e.g. `SuperPointExtractor.heatmap`), the single place where they plug in.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from utils.config import check_choice, check_int, merge
from utils.geometry import (HOMOGRAPHY_DEFAULTS, denormalize_homography, grid_valid_mask, sample_homographies,
                            sample_with_grid, sampling_grid)

# 'sum' is the reference's spelling of the masked mean (see the module docstring), accepted as an alias.
AGGREGATIONS = ("mean", "sum", "max")

# The label exports' homographies (see the module docstring); the sampler's other keys keep their defaults.
ADAPTATION_HOMOGRAPHIES = {**HOMOGRAPHY_DEFAULTS, "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2,
                           "perspective_amplitude_y": 0.2, "patch_ratio": 0.85, "allow_artifacts": True}

default_conf = {
    "enable": True,  # false: a single pass, as num <= 1
    "num": 100,  # views per image, the identity included
    "aggregation": "mean",
    "filter_counts": 0,
    "valid_border_margin": 3,  # erosion radius of the valid masks in pixels (TF SuperPoint's default)
    "chunk": 1,  # warps per network call; on the CPU one at a time was the fastest measured (benchmarks/)
    "homographies": {"params": dict(ADAPTATION_HOMOGRAPHIES)},
}

HeatmapFn = Callable[[torch.Tensor], torch.Tensor]


def merged_conf(conf: Mapping | None, source: str = "homography_adaptation") -> dict:
    """`default_conf` updated with `conf`; unknown keys and bad values are ConfigErrors."""
    out = merge(default_conf, conf, source=source, prefix="homography_adaptation.")
    check_choice(out["aggregation"], AGGREGATIONS, "homography_adaptation.aggregation", source)
    for key, minimum in (("num", 0), ("chunk", 1), ("filter_counts", 0), ("valid_border_margin", 0)):
        out[key] = check_int(out[key], f"homography_adaptation.{key}", source, minimum=minimum)
    return out


def sample_adaptation_homographies(batch: int, num: int, height: int, width: int, params: Mapping | None,
                                   rng: np.random.Generator, device=None) -> torch.Tensor:
    """(B, num, 3, 3) float64 pixel homographies, original -> warped, for H x W images; the first of each
    image is the identity."""
    normalised = np.stack([sample_homographies(num, rng, params, identity_first=True) for _ in range(batch)])
    return torch.from_numpy(denormalize_homography(normalised, height, width)).to(device)


@torch.inference_mode()
def adapt_heatmap(images: torch.Tensor, heatmap_fn: HeatmapFn, conf: Mapping | None = None,
                  rng: np.random.Generator | int | None = 0) -> torch.Tensor:
    """Heatmap of `images` aggregated over `conf['num']` random homographies.

    images: (B, 1, H, W) in [0, 1] on any device. heatmap_fn: (N, 1, H, W) -> (N, H, W) probabilities.
    conf: keys of `default_conf`. rng: numpy Generator (or seed) drawing the homographies.
    Returns (B, H, W) float32 on the images' device. With num <= 1 (or enable false) it is exactly
    heatmap_fn(images).
    """
    conf = merged_conf(conf)
    if not conf["enable"] or conf["num"] <= 1:
        return heatmap_fn(images).float()
    b, _, h, w = images.shape
    homographies = sample_adaptation_homographies(b, int(conf["num"]), h, w, conf["homographies"]["params"],
                                                  np.random.default_rng(rng), images.device)
    return aggregate_over_homographies(images, homographies, heatmap_fn, conf)


@torch.inference_mode()
def aggregate_over_homographies(images: torch.Tensor, homographies: torch.Tensor, heatmap_fn: HeatmapFn,
                                conf: Mapping | None = None) -> torch.Tensor:
    """The aggregation of `adapt_heatmap` under given homographies.

    images: (B, 1, H, W). homographies: (B, N, 3, 3) or (1, N, 3, 3) pixel, original -> warped (exact
    identities are passed through without resampling). conf: keys of `default_conf` (`num` and
    `homographies` unused). Returns (B, H, W) float32.
    """
    conf = merged_conf(conf)
    b, _, h, w = images.shape
    device = images.device
    homs = homographies.to(device=device, dtype=torch.float64).expand(b, -1, 3, 3).reshape(-1, 3, 3)
    n_views = homs.shape[0] // b
    owner = torch.arange(b, device=device).repeat_interleave(n_views)  # image index of each view
    is_identity = (homs == torch.eye(3, dtype=torch.float64, device=device)).all(dim=-1).all(dim=-1)
    use_max = conf["aggregation"] == "max"
    prob = torch.zeros(b, h, w, device=device)
    counts = torch.zeros(b, h, w, device=device)
    chunk = int(conf["chunk"])
    for start in range(0, homs.shape[0], chunk):
        hom, src, ident = homs[start:start + chunk], owner[start:start + chunk], is_identity[start:start + chunk]
        views = images[src].float()
        grid = sampling_grid(hom, (h, w))  # one per view, for its warp and its valid mask
        heat = heatmap_fn(_unless_identity(ident, views, lambda: sample_with_grid(views, grid))).float().to(device)
        mask = grid_valid_mask(grid, (h, w), int(conf["valid_border_margin"])).to(device)
        stacked = torch.cat([heat[:, None] * mask, mask], dim=1)  # (n, 2, H, W)
        back = _unless_identity(ident, stacked,
                                lambda: sample_with_grid(stacked, sampling_grid(torch.linalg.inv(hom), (h, w))))
        counts.index_add_(0, src, back[:, 1])
        if use_max:
            flat = back[:, 0].reshape(len(src), -1)
            prob.view(b, -1).scatter_reduce_(0, src[:, None].expand_as(flat), flat, "amax")
        else:
            prob.index_add_(0, src, back[:, 0])
    if not use_max:
        prob = prob / counts.clamp_min(1e-6)
    if conf["filter_counts"]:
        # Counts are bilinear resamplings of 0/1 masks: allow for their rounding error.
        prob = torch.where(counts >= conf["filter_counts"] - 1e-3, prob, torch.zeros_like(prob))
    return prob


def _unless_identity(is_identity: torch.Tensor, unchanged: torch.Tensor, resample) -> torch.Tensor:
    """`resample()`, with the views whose homography is exactly the identity left `unchanged` (not
    resampled, so the identity view is exact); no selection pass when the chunk has none."""
    if not bool(is_identity.any()):
        return resample()
    if bool(is_identity.all()):
        return unchanged
    return torch.where(is_identity[:, None, None, None], unchanged, resample())
