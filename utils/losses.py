"""Training losses: the detector loss (and, from issue 6 on, the descriptor losses).

Every loss takes the network's raw outputs and computes in fp32, whatever precision the network ran at.

Detector targets (reference-spec section 5.2): a label map (B, 1, H, W) becomes one 65-way target per
8 x 8 cell: the cell's 64 label values laid out as `utils.keypoints.heatmap_to_cells` (channel
k = 8 dy + dx), plus a dustbin channel that is 1 only for cells without any label mass, then divided
by the channel sum so that every cell's target sums to 1 (k keypoints in a cell get 1/k each; soft
labels are renormalised). A cell is valid only when all its 64 pixels are valid.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from utils.config import ConfigError, check_choice
from utils.keypoints import CELL, heatmap_to_cells

DETECTOR_LOSSES = ("softmax", "cross_entropy")
LOG_CLAMP = -100.0  # nn.BCELoss clamps its logs here; so does the reference's loss


def labels_to_cell_targets(labels: torch.Tensor) -> torch.Tensor:
    """Label map (B, 1, H, W) or (B, H, W), values >= 0 -> per-cell targets (B, 65, H/8, W/8) fp32.

    Channels 0..63 are the cell's pixels (k = 8 dy + dx), channel 64 the dustbin; each cell sums to 1.
    """
    labels = labels.float()
    if labels.dim() == 4:
        labels = labels[:, 0]
    cells = heatmap_to_cells(labels)  # (B, 64, Hc, Wc)
    mass = cells.sum(dim=1, keepdim=True)
    dustbin = (mass <= 0).float()
    target = torch.cat([cells, dustbin], dim=1)
    return target / target.sum(dim=1, keepdim=True)


def cell_valid_mask(valid_mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) or (B, H, W) of 0/1 -> cell mask (B, H/8, W/8) fp32: the product of the
    cell's 64 pixels (a cell counts only when it is entirely valid)."""
    valid_mask = valid_mask.float()
    if valid_mask.dim() == 4:
        valid_mask = valid_mask[:, 0]
    return heatmap_to_cells(valid_mask).prod(dim=1)


def detector_loss(semi: torch.Tensor, target: torch.Tensor, cell_mask: torch.Tensor,
                  loss_type: str = "softmax") -> torch.Tensor:
    """Masked mean over valid cells of a per-cell loss between logits and 65-way targets.

    semi: (B, 65, Hc, Wc) logits, any float dtype. target: (B, 65, Hc, Wc), each cell summing to 1
    (`labels_to_cell_targets`). cell_mask: (B, Hc, Wc) 0/1 (`cell_valid_mask`).
    loss_type
      'softmax'       the reference's: binary cross-entropy of each of the 65 softmax probabilities
                      against its target value, summed over the 65 channels; logs clamped at -100 as
                      nn.BCELoss does.
      'cross_entropy' the paper's: softmax cross-entropy -sum_k t_k log softmax_k.
    Both are normalised as the reference: sum over cells of mask * loss / (sum of mask + 1e-10), so a
    batch with no valid cell gives 0. Returns a scalar fp32 tensor.
    """
    check_choice(loss_type, DETECTOR_LOSSES, "model.detector_loss.loss_type")
    logits = semi.float()
    target = target.float()
    log_p = torch.log_softmax(logits, dim=1)
    if loss_type == "softmax":
        log_not_p = torch.log1p(-log_p.exp())
        per_channel = -(target * log_p.clamp_min(LOG_CLAMP) + (1 - target) * log_not_p.clamp_min(LOG_CLAMP))
        per_cell = per_channel.sum(dim=1)
    else:
        per_cell = -(target * log_p).sum(dim=1)
    mask = cell_mask.float()
    return (per_cell * mask).sum() / (mask.sum() + 1e-10)


def labels_detector_loss(semi: torch.Tensor, labels: torch.Tensor, valid_mask: Optional[torch.Tensor],
                         loss_type: str = "softmax") -> torch.Tensor:
    """`detector_loss` from a label map (B, 1, H, W) and a pixel valid mask (B, 1, H, W) or None (all
    valid). H and W must be multiples of 8."""
    if labels.shape[-1] % CELL or labels.shape[-2] % CELL:
        raise ValueError(f"label map of size {tuple(labels.shape[-2:])} is not a multiple of {CELL}")
    target = labels_to_cell_targets(labels)
    if valid_mask is None:
        mask = torch.ones_like(target[:, 0])
    else:
        mask = cell_valid_mask(valid_mask)
    return detector_loss(semi, target, mask, loss_type)


# A descriptor loss: (desc (B, D, Hc, Wc), warped_desc (B, D, Hc, Wc), homographies (B, 3, 3) pixel,
# image -> warped image, warped_valid_mask (B, 1, H, W)) -> (loss scalar fp32, {name: scalar} stats).
DescriptorLoss = Callable[..., tuple]


def get_descriptor_loss(model_conf: Mapping) -> Optional[DescriptorLoss]:
    """The descriptor loss configured by `model.sparse_loss` / `model.dense_loss`, or None when
    `model.lambda_loss` is 0 (MagicPoint)."""
    if not model_conf.get("lambda_loss"):
        return None
    raise ConfigError(
        f"model.lambda_loss is {model_conf['lambda_loss']}: descriptor losses (model.sparse_loss / "
        f"model.dense_loss) are not implemented yet; set model.lambda_loss: 0 to train the detector only"
    )
