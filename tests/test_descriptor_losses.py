"""Sparse and dense descriptor losses against hand computations on tiny tensors, their masks, the
negatives' distance to the true match, the configuration, and the dense loss's bounded memory."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from utils.config import ConfigError
from utils.losses import (cell_centres, dense_descriptor_loss, get_descriptor_loss, mask_at,
                          sample_negative_cells, sparse_descriptor_loss)

REPO = Path(__file__).resolve().parents[1]


def unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def translation(dx, dy=0.0):
    return torch.tensor([[1.0, 0, dx], [0, 1, dy], [0, 0, 1]])[None]


def as_map(vectors, hc, wc):
    """(N, D) descriptors in raster order -> (1, D, Hc, Wc)."""
    return torch.stack(list(vectors)).T.reshape(1, -1, hc, wc)


def test_cell_centres_and_mask_lookup():
    centres = cell_centres(2, 3)
    # Raster order: row v * Wc + u is cell (u, v), at (8u + 3.5, 8v + 3.5).
    assert centres.tolist() == [[3.5, 3.5], [11.5, 3.5], [19.5, 3.5], [3.5, 11.5], [11.5, 11.5], [19.5, 11.5]]
    mask = torch.ones(1, 1, 16, 24)
    mask[0, 0, 5, 7] = 0
    points = torch.tensor([[[7.4, 4.6], [7.6, 4.6], [-0.6, 0.0], [23.4, 15.4], [float("nan"), 1.0],
                            [float("inf"), 1.0]]])
    # (7.4, 4.6) rounds to pixel (x 7, y 5): masked; (7.6, 4.6) to (8, 5); -0.6 is off the image.
    assert mask_at(mask, points).tolist() == [[False, True, False, True, False, False]]


# ------------------------------------------------------------------------------------------ sparse

def test_sparse_loss_by_hand_identity():
    # 2 x 2 cells; anchor descriptors e_0..e_3; warped cell t has similarity a with anchor t and b with
    # every other anchor. Identity homography: the match of anchor t is the centre of warped cell t.
    a, b, lam, m = 0.8, 0.3, 2.0, 6
    rest = math.sqrt(1 - a * a - 3 * b * b)
    anchors = [torch.eye(5)[i] for i in range(4)]
    warped = [torch.tensor([a if s == t else b for s in range(4)] + [rest]) for t in range(4)]
    loss, stats = sparse_descriptor_loss(as_map(anchors, 2, 2), as_map(warped, 2, 2), torch.eye(3)[None],
                                         torch.ones(1, 1, 16, 16), num_matching_attempts=10,
                                         num_masked_non_matches_per_match=m, lambda_d=lam,
                                         min_negative_distance=1.0)
    # 4 anchors (K = min(10, 4)); every negative is another cell (the match is 0 cells away), all with
    # similarity b: 4 * 6 active terms of b - 0.2, divided by their count + 1.
    expected_neg = 4 * m * (b - 0.2) / (4 * m + 1)
    assert loss.item() == pytest.approx(lam * (1 - a) + expected_neg, rel=1e-5)
    assert stats["loss_desc_pos"].item() == pytest.approx(lam * (1 - a), rel=1e-5)
    assert stats["loss_desc_neg"].item() == pytest.approx(expected_neg, rel=1e-5)
    assert stats["positive_dist"].item() == pytest.approx(math.sqrt(2 - 2 * a), rel=1e-5)
    assert stats["negative_dist"].item() == pytest.approx(math.sqrt(2 - 2 * b), rel=1e-5)


def test_sparse_loss_respects_the_valid_mask_under_a_translation():
    # 2 x 3 cells (16 x 24 pixels), warped image = image shifted right by one cell (8 px): anchor (u, v)
    # matches warped cell (u + 1, v); anchors of column 2 leave the image. The warped mask hides column 1,
    # so the anchors of column 0 have no valid match either: only the two anchors of column 1 count.
    hc, wc, n = 2, 3, 6
    a, b, m = 0.7, 0.3, 4
    anchors = [torch.eye(n + 1)[i] for i in range(n)]
    warped = []
    for t in range(n):
        u, v = t % wc, t // wc
        if u == 0:  # no anchor maps here: similarity b with every anchor
            warped.append(torch.tensor([b] * n + [math.sqrt(1 - n * b * b)]))
        elif u == 1:  # the match of the anchors of column 0: opposite (a large loss if it were counted)
            warped.append(-torch.eye(n + 1)[v * wc])
        else:
            pre = v * wc + 1
            warped.append(torch.tensor([a if s == pre else b for s in range(n)]
                                       + [math.sqrt(1 - a * a - (n - 1) * b * b)]))
    mask = torch.ones(1, 1, 16, 24)
    mask[..., 8:16] = 0
    loss, stats = sparse_descriptor_loss(as_map(anchors, hc, wc), as_map(warped, hc, wc), translation(8.0), mask,
                                         num_matching_attempts=n, num_masked_non_matches_per_match=m,
                                         lambda_d=1.0, min_negative_distance=1.0)
    # Negatives of a column-1 anchor (match in column 2): columns 0 and 2 outside the mask, not the
    # match itself; all at similarity b.
    assert loss.item() == pytest.approx((1 - a) + 2 * m * (b - 0.2) / (2 * m + 1), rel=1e-5)
    assert stats["positive_dist"].item() == pytest.approx(math.sqrt(2 - 2 * a), rel=1e-5)
    # Nothing valid at all: 0, not NaN, and gradients flow (zero).
    desc = as_map(anchors, hc, wc).requires_grad_(True)
    empty, _ = sparse_descriptor_loss(desc, as_map(warped, hc, wc), translation(100.0), mask)
    empty.backward()
    assert empty.item() == 0 and torch.all(desc.grad == 0)


def test_sparse_loss_interpolates_the_warped_descriptor_between_cells():
    # Shift by half a cell (4 px): the match of anchor (0, 0) lies halfway between warped cells 0 and 1,
    # so its positive descriptor is the normalised mean of the two.
    anchors = [torch.eye(4)[i] for i in range(4)]
    w0, w1 = unit(1.0, 0.0, 0.0, 1.0), unit(0.0, 1.0, 0.0, 1.0)
    warped = as_map([w0, w1, unit(0.0, 0.0, 1.0, 0.0), unit(0.0, 0.0, 1.0, 0.0)], 2, 2)
    mask = torch.ones(1, 1, 16, 16)
    mask[..., 8:, :] = 0  # only the first row of warped cells is valid
    loss, stats = sparse_descriptor_loss(as_map(anchors, 2, 2), warped, translation(4.0), mask,
                                         num_matching_attempts=4, num_masked_non_matches_per_match=1,
                                         min_negative_distance=0.0)
    d_b = (w0 + w1) / (w0 + w1).norm()
    expected_sim = float(d_b[0])  # <e_0, d_b>; anchor (1, 0) maps to x = 15.5: off the 16 x 16 image
    assert stats["positive_dist"].item() == pytest.approx(math.sqrt(2 - 2 * expected_sim), rel=1e-5)
    assert stats["loss_desc_pos"].item() == pytest.approx(1 - expected_sim, rel=1e-5)


def test_negatives_keep_their_distance_and_stay_valid(device):
    hc, wc, k, m = 10, 12, 200, 100
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.rand(2, k, 2, generator=gen, device=device) * torch.tensor([8.0 * wc, 8.0 * hc], device=device)
    allowed = torch.rand(2, hc * wc, generator=gen, device=device) < 0.7
    idx, ok = sample_negative_cells(targets, allowed, (hc, wc), m, min_distance=3.0, generator=gen)
    assert idx.device.type == device.type and idx.shape == (2, k, m) and ok.float().mean() > 0.999
    centres = cell_centres(hc, wc, device, torch.float32)
    distance = (centres[idx] - targets[:, :, None]).norm(dim=-1) / 8
    assert torch.all(distance[ok] >= 3.0)
    assert torch.all(allowed.gather(1, idx.reshape(2, -1)).reshape(idx.shape)[ok])
    # Accepted draws are uniform over the admissible cells: for a target in the middle of the grid,
    # every cell at least 3 cells away gets about the same count, the others none.
    middle = torch.tensor([[[48.0, 40.0]]], device=device)
    every = torch.ones(1, hc * wc, dtype=torch.bool, device=device)
    idx, ok = sample_negative_cells(middle, every, (hc, wc), 60000, 3.0, generator=gen)
    assert ok.all()
    counts = torch.bincount(idx.reshape(-1), minlength=hc * wc).float()
    admissible = (centres - middle[0]).norm(dim=-1) >= 24
    assert torch.all(counts[~admissible] == 0) and 0 < (~admissible).sum() < hc * wc
    expected = 60000 / admissible.sum()
    assert counts[admissible].min() > 0.8 * expected and counts[admissible].max() < 1.2 * expected
    # Without the distance constraint (the reference's inert filter) the true match is drawn too.
    targets = centres[torch.randint(hc * wc, (1, k), generator=gen, device=device)]
    idx, _ = sample_negative_cells(targets, every, (hc, wc), m, 0.0, generator=gen)
    assert (((centres[idx] - targets[:, :, None]).norm(dim=-1)) == 0).any()


def test_sparse_loss_samples_on_the_device_and_backpropagates(device):
    torch.manual_seed(0)
    desc = torch.randn(2, 16, 6, 8, device=device, requires_grad=True)
    warped = torch.randn(2, 16, 6, 8, device=device, requires_grad=True)
    hom = torch.tensor([[0.95, 0.05, 3.0], [-0.04, 1.02, -2.0], [1e-4, 0.0, 1.0]], device=device).expand(2, 3, 3)
    loss, stats = sparse_descriptor_loss(desc, warped, hom, torch.ones(2, 1, 48, 64, device=device),
                                         num_matching_attempts=20, num_masked_non_matches_per_match=10)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.device.type == device.type
    assert torch.isfinite(desc.grad).all() and desc.grad.abs().sum() > 0 and warped.grad.abs().sum() > 0
    assert set(stats) == {"positive_dist", "negative_dist", "loss_desc_pos", "loss_desc_neg"}


# ------------------------------------------------------------------------------------------- dense

def dense_by_hand(anchors, warped, shift_x, valid_cells, dist, lam, hc, wc):
    """Python loops over every (anchor, warped cell) pair."""
    total, pairs = 0.0, 0
    for s in range(hc * wc):
        sx, sy = 8 * (s % wc) + 3.5 + shift_x, 8 * (s // wc) + 3.5
        for t in range(hc * wc):
            if not valid_cells[t]:
                continue
            tx, ty = 8 * (t % wc) + 3.5, 8 * (t // wc) + 3.5
            dot = float(anchors[s] @ warped[t])
            near = math.hypot(sx - tx, sy - ty) <= dist
            total += lam * max(0.0, 1 - dot) if near else max(0.0, dot - 0.2)
            pairs += 1
    return total / pairs


def test_dense_loss_by_hand_with_chunks_mask_and_lambda():
    hc, wc = 2, 3
    gen = torch.Generator().manual_seed(3)
    anchors = torch.nn.functional.normalize(torch.randn(hc * wc, 4, generator=gen), dim=1)
    warped = torch.nn.functional.normalize(anchors + 0.8 * torch.randn(hc * wc, 4, generator=gen), dim=1)
    mask = torch.ones(1, 1, 16, 24)
    mask[..., 8:, 16:] = 0  # warped cell (2, 1) invalid
    valid_cells = [True] * 5 + [False]
    for shift in (0.0, 8.0, 4.0):  # identity, one cell, half a cell (4 px: exactly at the threshold)
        for lam in (1.0, 250.0):
            expected = dense_by_hand(anchors, warped, shift, valid_cells, 4.0, lam, hc, wc)
            for chunk in (1, 7, 10 ** 6):
                loss, _ = dense_descriptor_loss(as_map(anchors, hc, wc), as_map(warped, hc, wc), translation(shift),
                                                mask, descriptor_dist=4.0, lambda_d=lam, max_pairs_per_chunk=chunk)
                assert loss.item() == pytest.approx(expected, rel=1e-5), (shift, lam, chunk)


def test_dense_loss_chunked_gradients_and_stats_match_one_chunk():
    torch.manual_seed(1)
    desc = torch.randn(2, 8, 4, 5)
    warped = torch.randn(2, 8, 4, 5)
    hom = torch.tensor([[1.0, 0.02, 5.0], [0.0, 0.98, 3.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    mask = torch.ones(2, 1, 32, 40)
    mask[1, :, :10] = 0
    results = []
    for chunk in (100, 10 ** 6):
        d, w = desc.clone().requires_grad_(True), warped.clone().requires_grad_(True)
        loss, stats = dense_descriptor_loss(d, w, hom, mask, descriptor_dist=7.5, lambda_d=10.0,
                                            max_pairs_per_chunk=chunk)
        loss.backward()
        results.append((loss.detach(), stats, d.grad, w.grad))
    (l1, s1, g1, h1), (l2, s2, g2, h2) = results
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(g1, g2, atol=1e-7) and torch.allclose(h1, h2, atol=1e-7)
    assert g1.abs().sum() > 0
    for key in s1:
        assert s1[key].item() == pytest.approx(s2[key].item(), rel=1e-5, abs=1e-7)
    assert (s1["loss_desc_pos"] + s1["loss_desc_neg"]).item() == pytest.approx(l1.item(), rel=1e-5)
    # No valid warped cell: 0, not NaN.
    zero, _ = dense_descriptor_loss(desc, warped, hom, torch.zeros_like(mask))
    assert zero.item() == 0


MEMORY_PROBE = """
import resource, sys, torch
from utils.losses import dense_descriptor_loss
torch.set_num_threads(1)
b, h, w = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def run(b, h, w):
    desc = torch.randn(b, 256, h // 8, w // 8, requires_grad=True)
    warped = torch.randn(b, 256, h // 8, w // 8, requires_grad=True)
    hom = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]).expand(b, 3, 3)
    loss, _ = dense_descriptor_loss(desc, warped, hom, torch.ones(b, 1, h, w))
    loss.backward()
    return desc.numel() * 4
run(1, 32, 32)  # allocator and kernels warmed up: the baseline counts none of that
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inputs = run(b, h, w)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, inputs)
"""


def dense_peak_bytes(batch, height, width):
    """Peak resident-memory increase (bytes) of a forward + backward of the dense loss in a fresh
    process, and the size of one descriptor map. A fixed glibc mmap threshold makes large blocks go
    back to the system when freed, so the peak RSS follows the live tensors (elsewhere the variable is
    ignored and the measure only gets looser)."""
    pytest.importorskip("resource")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_PROBE), str(batch), str(height), str(width)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=True)
    peak, inputs = map(int, out.stdout.split())
    return peak, inputs


def test_dense_loss_memory_is_bounded_at_batch_8_240x320():
    peak, inputs = dense_peak_bytes(8, 240, 320)
    # One (B, N, N) float tensor of all pairs is 8 * 1200^2 * 4 = 46 MB and an unchunked graph holds
    # several (about 290 MB measured with a single chunk); the chunked loss holds the descriptors, their
    # normalised copies and gradients (8 x 9.8 MB) plus a few 4 MB chunk tensors (about 75 MB measured).
    assert peak < 8 * inputs + 100e6, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.slow
def test_dense_loss_memory_is_bounded_at_480x640():
    peak, inputs = dense_peak_bytes(2, 480, 640)  # 4800 cells: 46M pairs, 184 MB per (B, N, N) tensor
    assert peak < 8 * inputs + 100e6, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("loss_fn", [sparse_descriptor_loss, dense_descriptor_loss])
def test_a_nan_descriptor_gives_a_nan_loss(loss_fn):
    # The trainer skips non-finite steps; a loss that hid the NaN would train on garbage instead.
    desc = torch.randn(1, 8, 2, 3)
    desc[0, :, 1, 1] = float("nan")
    loss, _ = loss_fn(desc, torch.randn(1, 8, 2, 3), torch.eye(3)[None], torch.ones(1, 1, 16, 24))
    assert torch.isnan(loss)


# ------------------------------------------------------------------------------------------ config

def test_get_descriptor_loss_reads_the_reference_keys():
    sparse = {"lambda_loss": 1, "sparse_loss": {"enable": True, "params": {
        "num_matching_attempts": 600, "num_masked_non_matches_per_match": 100, "lamda_d": 2, "dist": "cos",
        "method": "2d", "other_settings": "unused"}}, "dense_loss": {"enable": False, "params": {"lambda_d": 800}}}
    fn = get_descriptor_loss(sparse)
    assert fn.func is sparse_descriptor_loss
    assert fn.keywords == {"num_matching_attempts": 600, "num_masked_non_matches_per_match": 100, "lambda_d": 2.0,
                           "min_negative_distance": 2.0}
    dense = {"lambda_loss": 1, "dense_loss": {"enable": True, "params": {"descriptor_dist": 4, "lambda_d": 800}}}
    fn = get_descriptor_loss(dense)
    # lambda_d is honoured (the reference ignored the config's lambda_d).
    assert fn.func is dense_descriptor_loss and fn.keywords["lambda_d"] == 800.0
    assert fn.keywords["descriptor_dist"] == 4.0
    assert get_descriptor_loss({"lambda_loss": 1, "dense_loss": {"enable": True, "params": {"lamda_d": 5}}}
                               ).keywords["lambda_d"] == 5.0
    assert get_descriptor_loss({**dense, "lambda_loss": 0}) is None


@pytest.mark.parametrize("model, match", [
    ({"sparse_loss": {"enable": True, "params": {"num_matching_attempt": 5}}}, "num_matching_attempt"),
    ({"sparse_loss": {"enable": True, "params": {"method": "1d"}}}, "method"),
    ({"sparse_loss": {"enable": True, "params": {"num_matching_attempts": 0}}}, "num_matching_attempts"),
    ({"dense_loss": {"enable": True, "params": {"lambda_d": 800, "lamda_d": 250}}}, "disagree"),
    ({"sparse_loss": {"enable": True}, "dense_loss": {"enable": True}}, "both"),
    ({}, "lambda_loss"),
])
def test_descriptor_loss_config_errors_name_the_key(model, match):
    with pytest.raises(ConfigError, match=match):
        get_descriptor_loss({"lambda_loss": 1, **model}, "x.yaml")
