"""Training losses: the detector loss and the descriptor losses (sparse and dense).

Every loss takes the network's raw outputs and computes in fp32, whatever precision the network ran at.

`TrainingLoss` is the training objective of a batch (what the trainer minimises and validates). The
detector targets and cell masks come from label maps and pixel masks through `labels_to_cell_targets`
(the reference's labels2Dto3D) and `valid_mask_to_cells` (a cell is valid only when all its pixels are).

Descriptor-loss geometry (both losses). The descriptor of cell (u, v) (column u, row v) describes the
cell's centre, the pixel point (8u + 3.5, 8v + 3.5) (the convention of `utils.keypoints
.sample_descriptors`). A cell of the image corresponds to the point H (8u + 3.5, 8v + 3.5) of the
warped image, H being the sample's pixel homography (image -> warped image, `utils.geometry
.warp_points`). A point p of the warped image is *valid* when it falls on a pixel of the image and the
warped valid mask is 1 at that pixel (round(p), as `utils.geometry.inside_image`); warped cells are
valid when their centre is (the mask at pixel (8u + 4, 8v + 4)). Descriptors are L2-normalised once
on entry (the networks already return unit vectors; this keeps the hinge margins meaningful for any
input), and similarities are dot products of unit vectors (the reference's `dist: cos`).
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.config import IGNORED, ConfigError, check_choice, check_int, check_number, check_positive, merge
from utils.geometry import inside_image, pixel_grid, warp_points
from utils.keypoints import CELL, heatmap_to_cells, sample_descriptors

DETECTOR_LOSSES = ("softmax", "cross_entropy")
LOG_CLAMP = -100.0  # nn.BCELoss clamps its logs here; so does the reference's loss


def labels_to_cell_targets(labels: torch.Tensor) -> torch.Tensor:
    """Detector targets from label maps (the reference's `labels2Dto3D`).

    labels: (B, 1, H, W) non-negative (binary or soft), H and W multiples of 8.
    Returns (B, 65, H/8, W/8): channels 0..63 are the cell's pixels in the order of
    `utils.keypoints.heatmap_to_cells` (k = 8 dy + dx), channel 64 the dustbin, which is 1 only for
    cells with no label mass. Each cell is then divided by its sum, so k keypoints in a cell get 1/k
    each and a cell with mass holds a distribution over its 64 pixels.
    """
    b, c, h, w = labels.shape
    if c != 1 or h % CELL or w % CELL:
        raise ValueError(f"labels must be (B, 1, H, W) with H, W multiples of {CELL}; got {tuple(labels.shape)}")
    cells = heatmap_to_cells(labels[:, 0].float())
    mass = cells.sum(dim=1, keepdim=True)
    dustbin = (mass <= 0).to(cells.dtype)
    targets = torch.cat([cells, dustbin], dim=1)
    return targets / targets.sum(dim=1, keepdim=True)


def valid_mask_to_cells(mask: torch.Tensor) -> torch.Tensor:
    """Cell mask, as the reference's: (B, 1, H, W) pixel mask -> (B, 1, H/8, W/8), the
    product over each cell's 64 pixels (a cell is valid only if all its pixels are)."""
    return heatmap_to_cells(mask[:, 0].float()).prod(dim=1, keepdim=True)


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


# --------------------------------------------------------------------------------------------------
# Descriptor losses: the reference's sparse and dense losses, with its bugs fixed (see each docstring)
# --------------------------------------------------------------------------------------------------

POSITIVE_MARGIN = 1.0  # hinge max(0, 1 - <d_a, d_b>) on matching descriptors (reference)
NEGATIVE_MARGIN = 0.2  # hinge max(0, <d_a, d_n> - 0.2) on non-matching descriptors (reference)
NEGATIVE_REDRAWS = 16  # rejection-sampling rounds of `sample_negative_cells`


def cell_centres(hc: int, wc: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """(Hc * Wc, 2) pixel points x, y of the cell centres (8u + 3.5, 8v + 3.5), in raster order: row
    v * Wc + u is cell (u, v), the order of `desc.flatten(2)`."""
    return pixel_grid(hc, wc, device=device, dtype=dtype).reshape(-1, 2) * CELL + (CELL - 1) / 2


def mask_at(mask: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: points (B, N, 2) x, y that fall on a pixel of the (B, 1, H, W) mask (`inside_image`)
    where it is > 0.5. Non-finite points are invalid."""
    b, _, h, w = mask.shape
    inside = inside_image(points, h, w)  # comparisons with NaN are False
    pix = points.nan_to_num(0.0, 0.0, 0.0).round().long()
    x, y = pix[..., 0].clamp(0, w - 1), pix[..., 1].clamp(0, h - 1)
    return inside & (mask.reshape(b, h * w).gather(1, y * w + x) > 0.5)


def sample_negative_cells(targets: torch.Tensor, allowed: torch.Tensor, cell_shape, num: int,
                          min_distance: float, generator: Optional[torch.Generator] = None,
                          rounds: int = NEGATIVE_REDRAWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-matching cells of the warped image for each anchor, drawn on the targets' device.

    targets: (B, K, 2) x, y pixels, each anchor's true match in the warped image. allowed: (B, N) bool,
    N = Hc * Wc, the warped cells that may serve as negatives. cell_shape: (Hc, Wc). num: M negatives
    per anchor. min_distance: in cells, the least Euclidean distance between a negative's cell centre
    and the true match, i.e. |centre - target| / 8 >= min_distance.
    Each negative is drawn uniformly among the N cells and redrawn while it is too close or not allowed,
    `rounds` times at most: rejection sampling, so accepted draws are uniform over the admissible cells.
    Returns (indices (B, K, M) long in [0, N), admissible (B, K, M) bool); a draw still inadmissible
    after the last round (probability (1 - f)^(rounds + 1), f the admissible fraction) is marked False.
    """
    b, k, _ = targets.shape
    hc, wc = cell_shape
    n = hc * wc
    centres = cell_centres(hc, wc, targets.device, targets.dtype)

    def inadmissible(idx):
        too_close = (centres[idx] - targets[:, :, None]).norm(dim=-1) < min_distance * CELL
        return too_close | ~allowed.gather(1, idx.reshape(b, -1)).reshape(idx.shape)

    idx = torch.randint(n, (b, k, num), generator=generator, device=targets.device)
    bad = inadmissible(idx)
    for _ in range(rounds):
        if not bool(bad.any()):
            break
        idx = torch.where(bad, torch.randint(n, (b, k, num), generator=generator, device=targets.device), idx)
        bad = inadmissible(idx)
    return idx, ~bad


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sparse_descriptor_loss(desc: torch.Tensor, warped_desc: torch.Tensor, homographies: torch.Tensor,
                           warped_valid_mask: torch.Tensor, num_matching_attempts: int = 1000,
                           num_masked_non_matches_per_match: int = 100, lambda_d: float = 1.0,
                           min_negative_distance: float = 2.0, generator: Optional[torch.Generator] = None
                           ) -> tuple[torch.Tensor, dict]:
    """Sparse contrastive descriptor loss. The reference ignored the valid mask, and its filter that keeps
    negatives away from the true match had zero weights; here both work (min_negative_distance).

    desc, warped_desc: (B, D, Hc, Wc) descriptors of the image and of its warped version.
    homographies: (B, 3, 3) pixel homographies image -> warped image. warped_valid_mask: (B, 1, H, W).
    For each image, with the geometry of the module docstring:
    1. anchors: K = min(num_matching_attempts, Hc * Wc) cells drawn at random without replacement,
       among those whose match H (8u + 3.5, 8v + 3.5) is valid in the warped image first; anchors with
       an invalid match (when fewer than K are valid) take no part.
    2. positive term: d_a = the anchor cell's descriptor, d_b = warped_desc interpolated bilinearly at
       the match and renormalised (`utils.keypoints.sample_descriptors`);
       L_pos = mean over anchors of max(0, 1 - <d_a, d_b>).
    3. negative term: M = num_masked_non_matches_per_match valid cells of the warped image per anchor,
       at least `min_negative_distance` cells from the match (`sample_negative_cells`);
       L_neg = sum of max(0, <d_a, d_n> - 0.2) / (number of non-zero terms + 1) (the reference's
       normalisation, which averages over the active negatives).
    4. L = lambda_d L_pos + L_neg per image, averaged over the images that have a valid anchor (0 if
       none has). All sampling runs on the descriptors' device (`generator`: optional, on that device).
    Returns (loss scalar fp32, stats): `positive_dist` / `negative_dist`, the mean Euclidean distance
    sqrt(2 - 2 <., .>) of the positive / negative pairs, and `loss_desc_pos` + `loss_desc_neg` = loss.
    """
    b, d, hc, wc = desc.shape
    n = hc * wc
    device = desc.device
    anchor_desc = F.normalize(desc.float(), dim=1).flatten(2)  # (B, D, N)
    warped = F.normalize(warped_desc.float(), dim=1)  # (B, D, Hc, Wc)
    centres = cell_centres(hc, wc, device).expand(b, n, 2)
    matches = warp_points(centres, homographies.to(device, torch.float64))  # (B, N, 2)
    valid = mask_at(warped_valid_mask.to(device), matches)  # (B, N)

    k = min(int(num_matching_attempts), n)
    keys = torch.rand(b, n, generator=generator, device=device).masked_fill(~valid, -1.0)
    anchors = keys.topk(k, dim=1).indices  # (B, K): valid cells first, in random order
    used = valid.gather(1, anchors)  # (B, K)
    targets = matches.gather(1, anchors[..., None].expand(b, k, 2))
    targets = torch.where(used[..., None], targets, torch.zeros_like(targets))  # finite placeholders
    d_a = anchor_desc.gather(2, anchors[:, None].expand(b, d, k)).transpose(1, 2)  # (B, K, D)
    d_b = sample_descriptors(warped, targets.float())  # (B, K, D)
    pos_sim = (d_a * d_b).sum(-1)  # (B, K)
    n_pos = used.sum(1)
    pos_loss = (F.relu(POSITIVE_MARGIN - pos_sim) * used).sum(1) / n_pos.clamp_min(1)

    allowed = mask_at(warped_valid_mask.to(device), centres)
    negatives, neg_used = sample_negative_cells(targets, allowed, (hc, wc), int(num_masked_non_matches_per_match),
                                                min_negative_distance, generator)
    neg_used &= used[..., None]
    # <d_a, every warped cell> then a gather: (B, K, N) floats instead of (B, K, M, D) gathered vectors.
    neg_sim = torch.bmm(d_a, warped.flatten(2)).gather(2, negatives)  # (B, K, M)
    neg_terms = F.relu(neg_sim - NEGATIVE_MARGIN) * neg_used
    neg_loss = neg_terms.sum((1, 2)) / ((neg_terms > 0).sum((1, 2)) + 1)

    has_anchor = (n_pos > 0).float()
    images = has_anchor.sum().clamp_min(1)
    loss = ((lambda_d * pos_loss + neg_loss) * has_anchor).sum() / images
    with torch.no_grad():
        stats = {
            "positive_dist": _masked_mean((2 - 2 * pos_sim).clamp_min(0).sqrt(), used),
            "negative_dist": _masked_mean((2 - 2 * neg_sim).clamp_min(0).sqrt(), neg_used),
            "loss_desc_pos": (lambda_d * pos_loss * has_anchor).sum() / images,
            "loss_desc_neg": (neg_loss * has_anchor).sum() / images,
        }
    return loss, stats


def _dense_chunk(anchor_desc: torch.Tensor, anchor_targets: torch.Tensor, warped_desc: torch.Tensor,
                 centres: torch.Tensor, target_valid: torch.Tensor, descriptor_dist: float, lambda_d: float):
    """Dense-loss sums for a chunk of c anchor cells (see `dense_descriptor_loss`).

    anchor_desc: (B, c, D) unit; anchor_targets: (B, c, 2) warped anchor centres; warped_desc: (B, D, N)
    unit; centres: (N, 2) cell centres; target_valid: (B, N) 0/1.
    Returns (sum of the masked pair losses, (5,) [sum of positive-pair losses, sum of positive
    distances, positive pairs, sum of negative distances, negative pairs] without gradient).
    """
    b = anchor_desc.shape[0]
    dot = torch.bmm(anchor_desc, warped_desc)  # (B, c, N)
    near = torch.cdist(anchor_targets, centres.expand(b, *centres.shape),
                       compute_mode="donot_use_mm_for_euclid_dist") <= descriptor_dist  # NaN/inf: False
    weight = target_valid[:, None, :]
    pair_loss = torch.where(near, lambda_d * F.relu(POSITIVE_MARGIN - dot), F.relu(dot - NEGATIVE_MARGIN)) * weight
    with torch.no_grad():
        dist = (2 - 2 * dot).clamp_min(0).sqrt()
        pos, neg = near & (weight > 0), ~near & (weight > 0)
        stats = torch.stack([(pair_loss * pos).sum(), (dist * pos).sum(), pos.sum(), (dist * neg).sum(), neg.sum()])
    return pair_loss.sum(), stats


def dense_descriptor_loss(desc: torch.Tensor, warped_desc: torch.Tensor, homographies: torch.Tensor,
                          warped_valid_mask: torch.Tensor, descriptor_dist: float = 4.0, lambda_d: float = 250.0,
                          max_pairs_per_chunk: int = 2 ** 20) -> tuple[torch.Tensor, dict]:
    """Dense descriptor loss over every pair of cells. The reference ignored the config's `lambda_d` (it read
    `lamda_d`, default 250) and divided the sum both by the valid-cell count and by Hc * Wc; here
    `lambda_d` is honoured and the sum is normalised once.

    Shapes as `sparse_descriptor_loss`. With the geometry of the module docstring, anchor cell a of the
    image and cell t of the warped image are a positive pair when the warped centre of a lies within
    `descriptor_dist` pixels of the centre of t (s = 1), else a negative pair:
        l(a, t) = lambda_d s max(0, 1 - <d_a, d'_t>) + (1 - s) max(0, <d_a, d'_t> - 0.2),
    counted only where t is valid. Normalised once: the sum of l over the batch divided by
    N * (number of valid warped cells in the batch), N = Hc * Wc, i.e. the mean over all counted
    (anchor, target) pairs (0 when no target is valid). lambda_d weighs the rare positives (about one
    per anchor) against the N - 1 negatives.
    Memory: anchors are processed in chunks of at most `max_pairs_per_chunk` pairs (B x chunk x N), and
    with gradients each chunk is checkpointed (recomputed in the backward pass), so the peak is a
    few chunk-sized tensors plus the descriptors, whatever the image size.
    Returns (loss scalar fp32, stats): `positive_dist` / `negative_dist` (mean sqrt(2 - 2 <., .>) of
    the counted positive / negative pairs) and `loss_desc_pos` + `loss_desc_neg` = loss.
    """
    b, d, hc, wc = desc.shape
    n = hc * wc
    device = desc.device
    anchor_desc = F.normalize(desc.float(), dim=1).flatten(2).transpose(1, 2)  # (B, N, D)
    warped = F.normalize(warped_desc.float(), dim=1).flatten(2)  # (B, D, N)
    centres = cell_centres(hc, wc, device)
    anchor_targets = warp_points(centres.expand(b, n, 2), homographies.to(device, torch.float64)).float()
    target_valid = mask_at(warped_valid_mask.to(device), centres.expand(b, n, 2)).float()  # (B, N)
    centres = centres.float()
    step = max(1, int(max_pairs_per_chunk) // (b * n))
    grad = torch.is_grad_enabled() and (anchor_desc.requires_grad or warped.requires_grad)
    total = anchor_desc.new_zeros(())
    sums = torch.zeros(5, device=device)
    for start in range(0, n, step):
        args = (anchor_desc[:, start:start + step], anchor_targets[:, start:start + step], warped, centres,
                target_valid, float(descriptor_dist), float(lambda_d))
        part, part_stats = checkpoint(_dense_chunk, *args, use_reentrant=False) if grad else _dense_chunk(*args)
        total = total + part
        sums += part_stats
    norm = (n * target_valid.sum()).clamp_min(1)
    loss = total / norm
    with torch.no_grad():
        stats = {
            "positive_dist": sums[1] / sums[2].clamp_min(1),
            "negative_dist": sums[3] / sums[4].clamp_min(1),
            "loss_desc_pos": sums[0] / norm,
            "loss_desc_neg": loss.detach() - sums[0] / norm,
        }
    return loss, stats


# A descriptor loss: (desc (B, D, Hc, Wc), warped_desc (B, D, Hc, Wc), homographies (B, 3, 3) pixel,
# image -> warped image, warped_valid_mask (B, 1, H, W)) -> (loss scalar fp32, {name: scalar} stats).
DescriptorLoss = Callable[..., tuple]

# `model.sparse_loss.params` / `model.dense_loss.params`, the keys of the reference's configs. The weight of the
# positive term is `lambda_d`; the reference's configs spell it `lamda_d` for the sparse loss, and
# either spelling is accepted for both losses.
sparse_loss_defaults = {
    "num_matching_attempts": 1000,  # anchors per image
    "num_masked_non_matches_per_match": 100,  # negatives per anchor
    "lambda_d": None,  # default 1
    "lamda_d": None,
    "min_negative_distance": 2.0,  # cells between a negative and the true match (new; the reference had none)
    "dist": "cos",
    "method": "2d",
    "other_settings": IGNORED,
}
dense_loss_defaults = {
    "descriptor_dist": 4,  # pixels: positive radius (TF: 7.5)
    "lambda_d": None,  # default 250 (the reference ignored the configs' 800 and used 250)
    "lamda_d": None,
    "max_pairs_per_chunk": 2 ** 20,  # memory bound of the chunked computation
    "other_settings": IGNORED,
}
SPARSE_LAMBDA_D, DENSE_LAMBDA_D = 1.0, 250.0


def _lambda_d(params: Mapping, default: float, key: str, source: str) -> float:
    values = {k: params[k] for k in ("lambda_d", "lamda_d") if params[k] is not None}
    if len(values) == 2 and values["lambda_d"] != values["lamda_d"]:
        raise ConfigError(f"{source}: '{key}.lambda_d' ({values['lambda_d']}) and its reference spelling "
                          f"'{key}.lamda_d' ({values['lamda_d']}) disagree; give one of them")
    return check_number(next(iter(values.values()), default), f"{key}.lambda_d", source, low=0, example=default)


def get_descriptor_loss(model_conf: Mapping, source: str = "config") -> Optional[DescriptorLoss]:
    """The descriptor loss configured by `model.sparse_loss` / `model.dense_loss` (exactly one enabled)
    as a callable with the DescriptorLoss signature, or None when `model.lambda_loss` is 0 (MagicPoint).
    Unknown or invalid params are ConfigErrors naming the key."""
    if not model_conf.get("lambda_loss"):
        return None
    sparse = model_conf.get("sparse_loss") or {}
    dense = model_conf.get("dense_loss") or {}
    if sparse.get("enable") and dense.get("enable"):
        raise ConfigError(f"{source}: model.sparse_loss.enable and model.dense_loss.enable are both true; "
                          f"enable one descriptor loss")
    if sparse.get("enable"):
        key = "model.sparse_loss.params"
        p = merge(sparse_loss_defaults, sparse.get("params"), source=source, prefix=key + ".")
        check_choice(p["dist"], ("cos",), key + ".dist", source)
        check_choice(p["method"], ("2d",), key + ".method", source)
        return functools.partial(
            sparse_descriptor_loss,
            num_matching_attempts=check_int(p["num_matching_attempts"], f"{key}.num_matching_attempts", source,
                                            minimum=1, example=1000),
            num_masked_non_matches_per_match=check_int(p["num_masked_non_matches_per_match"],
                                                       f"{key}.num_masked_non_matches_per_match", source,
                                                       minimum=1, example=100),
            lambda_d=_lambda_d(p, SPARSE_LAMBDA_D, key, source),
            min_negative_distance=check_number(p["min_negative_distance"], f"{key}.min_negative_distance", source,
                                               low=0, example=2.0))
    if dense.get("enable"):
        key = "model.dense_loss.params"
        p = merge(dense_loss_defaults, dense.get("params"), source=source, prefix=key + ".")
        return functools.partial(
            dense_descriptor_loss,
            descriptor_dist=check_positive(p["descriptor_dist"], f"{key}.descriptor_dist", source, example=4),
            lambda_d=_lambda_d(p, DENSE_LAMBDA_D, key, source),
            max_pairs_per_chunk=check_int(p["max_pairs_per_chunk"], f"{key}.max_pairs_per_chunk", source,
                                          minimum=1, example=2 ** 20))
    raise ConfigError(
        f"{source}: model.lambda_loss is {model_conf['lambda_loss']} but no descriptor loss is enabled: set "
        f"model.sparse_loss.enable or model.dense_loss.enable to true, or model.lambda_loss: 0 to train the "
        f"detector only")


class TrainingLoss:
    """The training objective of a batch: loss = loss_det + loss_det_warp + lambda_loss * loss_desc.

    model_conf: the `model` section (detector_loss.loss_type, lambda_loss and the descriptor loss of
    `get_descriptor_loss`, checked here once). Called with the fp32 network outputs of
    `torch.cat([image, warped_img])` (or of `image` alone without a warped pair) and the batch; the
    labels are `labels_2D` / `warped_labels`, or their `_gaussian` soft versions with `soft_labels`.
    Returns {name: scalar tensor}: the terms, the descriptor loss's statistics and 'loss' the total.
    """

    def __init__(self, model_conf: Mapping, source: str = "config"):
        self.loss_type = check_choice(model_conf["detector_loss"]["loss_type"], DETECTOR_LOSSES,
                                      "model.detector_loss.loss_type", source)
        self.descriptor_loss = get_descriptor_loss(model_conf, source)
        self.lambda_loss = float(model_conf["lambda_loss"] or 0)
        self.source = source

    def detector_term(self, semi: torch.Tensor, batch: Mapping, warped: bool, soft_labels: bool) -> torch.Tensor:
        key = ("warped_labels" if warped else "labels_2D") + ("_gaussian" if soft_labels else "")
        if key not in batch:
            raise KeyError(f"the dataset's samples have no '{key}' (needed by the detector loss)")
        valid = batch["warped_valid_mask" if warped else "valid_mask"].to(semi.device, non_blocking=True)
        labels = batch[key].to(semi.device, non_blocking=True)
        return detector_loss(semi, labels_to_cell_targets(labels), valid_mask_to_cells(valid), self.loss_type)

    def __call__(self, out: Mapping, batch: Mapping, soft_labels: bool = False) -> dict:
        b = batch["image"].shape[0]
        pair = "warped_img" in batch
        semi = out["semi"]
        losses = {"loss_det": self.detector_term(semi[:b], batch, False, soft_labels)}
        total = losses["loss_det"]
        if pair:
            losses["loss_det_warp"] = self.detector_term(semi[b:], batch, True, soft_labels)
            total = total + losses["loss_det_warp"]
        if self.descriptor_loss is not None:
            if not pair:
                raise ConfigError(f"{self.source}: model.lambda_loss > 0 needs warped pairs "
                                  f"(data.warped_pair.enable: true)")
            homographies = batch["homographies"].to(semi.device, non_blocking=True)
            warped_valid = batch["warped_valid_mask"].to(semi.device, non_blocking=True)
            loss_desc, stats = self.descriptor_loss(out["desc"][:b], out["desc"][b:], homographies, warped_valid)
            losses["loss_desc"] = loss_desc
            losses.update(stats)
            total = total + self.lambda_loss * loss_desc
        losses["loss"] = total
        return losses
