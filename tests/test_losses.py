"""Detector losses against hand computations and torch's own BCE / cross-entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.config import ConfigError
from utils.losses import detector_loss, get_descriptor_loss, labels_to_cell_targets, valid_mask_to_cells


def one_cell(points):
    """An 8 x 8 label map (1, 1, 8, 8) with ones at the (x, y) pixels."""
    labels = torch.zeros(1, 1, 8, 8)
    for x, y in points:
        labels[0, 0, y, x] = 1
    return labels


LOGITS = torch.tensor([0.05 * k - 1.0 for k in range(65)]).reshape(1, 65, 1, 1)


def hand_softmax():
    exps = [math.exp(0.05 * k - 1.0) for k in range(65)]
    total = sum(exps)
    return [e / total for e in exps]


def test_softmax_loss_one_cell_by_hand():
    # One keypoint at x=2, y=1: channel 8*1 + 2 = 10 is the target, the dustbin is 0.
    p = hand_softmax()
    expected = -math.log(p[10]) - sum(math.log(1 - p[k]) for k in range(65) if k != 10)
    target = labels_to_cell_targets(one_cell([(2, 1)]))
    loss = detector_loss(LOGITS, target, torch.ones(1, 1, 1, 1), "softmax")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_one_cell_by_hand():
    p = hand_softmax()
    target = labels_to_cell_targets(one_cell([(2, 1)]))
    loss = detector_loss(LOGITS, target, torch.ones(1, 1, 1), "cross_entropy")
    assert loss.item() == pytest.approx(-math.log(p[10]), rel=1e-6)
    # An empty cell targets the dustbin (channel 64).
    empty = labels_to_cell_targets(one_cell([]))
    assert detector_loss(LOGITS, empty, torch.ones(1, 1, 1), "cross_entropy").item() == pytest.approx(
        -math.log(p[64]), rel=1e-6)


def test_two_keypoints_share_the_cell_target():
    p = hand_softmax()
    target = labels_to_cell_targets(one_cell([(0, 0), (7, 7)]))  # channels 0 and 63, 1/2 each
    ce = detector_loss(LOGITS, target, torch.ones(1, 1, 1), "cross_entropy")
    assert ce.item() == pytest.approx(-0.5 * math.log(p[0]) - 0.5 * math.log(p[63]), rel=1e-6)
    bce = detector_loss(LOGITS, target, torch.ones(1, 1, 1), "softmax")
    expected = sum(-(0.5 * math.log(p[k]) + 0.5 * math.log(1 - p[k])) if k in (0, 63) else -math.log(1 - p[k])
                   for k in range(65))
    assert bce.item() == pytest.approx(expected, rel=1e-5)


def test_masked_mean_matches_torch_losses():
    torch.manual_seed(0)
    semi = torch.randn(2, 65, 3, 4) * 3
    labels = (torch.rand(2, 1, 24, 32) > 0.97).float()
    valid = torch.ones(2, 1, 24, 32)
    valid[0, 0, 5, 9] = 0  # invalidates cell (0, 1) of image 0
    valid[1, :, 16:] = 0  # invalidates the last row of cells of image 1
    target, mask = labels_to_cell_targets(labels), valid_mask_to_cells(valid)
    assert mask.sum() == 2 * 12 - 1 - 4
    m = mask[:, 0]
    bce = F.binary_cross_entropy(torch.softmax(semi, 1), target, reduction="none").sum(1)
    assert detector_loss(semi, target, mask, "softmax").item() == pytest.approx(
        ((bce * m).sum() / m.sum()).item(), rel=1e-5)
    ce = F.cross_entropy(semi, target, reduction="none")
    assert detector_loss(semi, target, mask, "cross_entropy").item() == pytest.approx(
        ((ce * m).sum() / m.sum()).item(), rel=1e-5)
    # No valid cell: zero, not NaN.
    assert detector_loss(semi, target, torch.zeros_like(mask), "softmax").item() == 0


def test_saturated_softmax_is_clamped_without_nan_gradient():
    semi = torch.zeros(1, 65, 1, 1)
    semi[0, 5] = 1000.0  # p_5 = 1 exactly in fp32, but the target is the dustbin
    semi.requires_grad_(True)
    target = labels_to_cell_targets(one_cell([]))
    loss = detector_loss(semi, target, torch.ones(1, 1, 1), "softmax")
    # -log p_64 = 1000 and -log(1 - p_5) = inf are both clamped to 100; the other terms are ~0.
    assert loss.item() == pytest.approx(200.0, rel=1e-4)
    loss.backward()
    assert torch.isfinite(semi.grad).all()


def test_loss_is_fp32_from_low_precision_logits():
    target = labels_to_cell_targets(one_cell([(3, 3)]))
    low = detector_loss(LOGITS.bfloat16(), target, torch.ones(1, 1, 1), "cross_entropy")
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(-math.log(hand_softmax()[27]), rel=2e-2)


def test_unknown_loss_type_and_descriptor_loss_configuration():
    target = labels_to_cell_targets(one_cell([]))
    with pytest.raises(ConfigError, match="loss_type"):
        detector_loss(LOGITS, target, torch.ones(1, 1, 1), "l2")
    assert get_descriptor_loss({"lambda_loss": 0}) is None
    with pytest.raises(ConfigError, match="lambda_loss"):
        get_descriptor_loss({"lambda_loss": 1})
