"""Training losses: the detector loss (and, from issue 6 on, the descriptor losses).

Every loss takes the network's raw outputs and computes in fp32, whatever precision the network ran at.

The detector targets and cell masks (reference-spec 5.2 steps 2-3) come from label maps and pixel
masks through `datasets.data_tools.labels_to_cell_targets` and `valid_mask_to_cells`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from utils.config import ConfigError, check_choice

DETECTOR_LOSSES = ("softmax", "cross_entropy")
LOG_CLAMP = -100.0  # nn.BCELoss clamps its logs here; so does the reference's loss


def detector_loss(semi: torch.Tensor, target: torch.Tensor, cell_mask: torch.Tensor,
                  loss_type: str = "softmax") -> torch.Tensor:
    """Masked mean over valid cells of a per-cell loss between logits and 65-way targets.

    semi: (B, 65, Hc, Wc) logits, any float dtype. target: (B, 65, Hc, Wc), each cell summing to 1
    (`labels_to_cell_targets`). cell_mask: (B, 1, Hc, Wc) or (B, Hc, Wc), 0/1 (`valid_mask_to_cells`).
    loss_type
      'softmax'       the reference's: binary cross-entropy of each of the 65 softmax probabilities
                      against its target value, summed over the 65 channels; logs clamped at -100 as
                      nn.BCELoss does (a saturated p = 1 gets log(1 - p) = -100 and no gradient).
      'cross_entropy' the paper's: softmax cross-entropy -sum_k t_k log softmax_k.
    Both are normalised as the reference: sum over cells of mask * loss / (sum of mask + 1e-10), so a
    batch with no valid cell gives 0. Returns a scalar fp32 tensor.
    """
    check_choice(loss_type, DETECTOR_LOSSES, "model.detector_loss.loss_type")
    logits = semi.float()
    target = target.float()
    log_p = torch.log_softmax(logits, dim=1)
    if loss_type == "softmax":
        p = log_p.exp()
        saturated = p >= 1  # log(1 - p) = -inf: clamped value, and no NaN gradient through log1p(-1)
        log_not_p = torch.where(saturated, LOG_CLAMP, torch.log1p(-torch.where(saturated, 0.0, p)))
        per_channel = -(target * log_p.clamp_min(LOG_CLAMP) + (1 - target) * log_not_p.clamp_min(LOG_CLAMP))
        per_cell = per_channel.sum(dim=1)
    else:
        per_cell = -(target * log_p).sum(dim=1)
    mask = cell_mask.float().reshape(per_cell.shape)
    return (per_cell * mask).sum() / (mask.sum() + 1e-10)


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
