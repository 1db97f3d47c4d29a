"""Label tools shared by the training datasets: label maps, residuals, soft labels, cell targets, and
labels that follow the image through homographic warps."""
import math

import numpy as np
import pytest
import torch

from datasets import data_tools as dt
from utils.geometry import warp_image, warp_points
from utils.losses import labels_to_cell_targets, valid_mask_to_cells

SYNTH_HOMOGRAPHY = {  # the homographic augmentation of configs/magicpoint_shapes_pair.yaml
    "translation": True, "rotation": True, "scaling": True, "perspective": True,
    "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2,
    "patch_ratio": 0.8, "max_angle": 1.57, "allow_artifacts": True, "translation_overflow": 0.05,
}


def test_label_map_rounds_points_and_ignores_those_outside():
    pts = torch.tensor([[2.6, 3.4], [0.0, 0.0], [-0.6, 5.0], [9.5, 2.0], [9.4, 7.45]])
    labels = dt.points_to_label_map(pts, 8, 10)
    expected = torch.zeros(8, 10)
    expected[3, 3] = 1  # (2.6, 3.4) rounds to column 3, row 3 (the reference truncated: column 2)
    expected[0, 0] = 1
    expected[7, 9] = 1  # (9.4, 7.45) is still on the last pixel; (9.5, 2) and (-0.6, 5) are off the image
    assert labels.dtype == torch.float32
    assert torch.equal(labels, expected)


def test_residuals_hold_point_minus_rounded_point_at_its_pixel():
    res = dt.points_to_residuals(torch.tensor([[2.6, 3.4], [5.0, 1.0]]), 8, 10)
    assert res.shape == (2, 8, 10) and res.dtype == torch.float32
    assert torch.allclose(res[:, 3, 3], torch.tensor([-0.4, 0.4]))
    assert torch.equal(res[:, 1, 5], torch.zeros(2))
    assert torch.count_nonzero(res) == 2


def test_bilinear_splat_puts_unit_mass_centred_on_the_point():
    splat = dt.bilinear_splat(torch.tensor([[2.25, 3.5]]), 8, 10)
    expected = torch.zeros(8, 10)
    expected[3, 2], expected[3, 3] = 0.75 * 0.5, 0.25 * 0.5
    expected[4, 2], expected[4, 3] = 0.75 * 0.5, 0.25 * 0.5
    assert torch.allclose(splat, expected)
    two = dt.bilinear_splat(torch.tensor([[4.0, 4.0], [4.0, 4.0]]), 8, 10)
    assert two[4, 4] == 2.0  # overlapping points add up (the reference overwrote)
    edge = dt.bilinear_splat(torch.tensor([[-0.5, 0.0]]), 8, 10)
    assert torch.isclose(edge.sum(), torch.tensor(0.5))  # the half beyond the border is dropped
    assert edge.min() >= 0  # no negative weights for points left of the image (reference bug)


def test_gaussian_labels_have_the_configured_sigma():
    sigma = 1.5
    soft = dt.gaussian_label_map(torch.tensor([[16.0, 12.0]]), 32, 40, sigma)
    r = int(3 * sigma)
    d = np.arange(-r, r + 1)
    g = np.exp(-d ** 2 / (2 * sigma ** 2))
    expected = np.zeros((32, 40))
    expected[12 - r:12 + r + 1, 16 - r:16 + r + 1] = np.outer(g, g) / g.sum() ** 2
    np.testing.assert_allclose(soft.numpy(), expected, atol=1e-7)
    assert soft.dtype == torch.float32
    assert math.isclose(soft[12, 17] / soft[12, 16], math.exp(-1 / (2 * sigma ** 2)), rel_tol=1e-5)


def test_gaussian_labels_of_a_subpixel_point_match_the_analytic_gaussian():
    sigma, (x0, y0) = 2.0, (20.3, 14.7)
    soft = dt.gaussian_label_map(torch.tensor([[x0, y0]]), 32, 40, sigma).double().numpy()
    ys, xs = np.mgrid[0:32, 0:40]
    analytic = np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma ** 2))
    analytic /= analytic.sum()
    assert np.abs(soft - analytic).max() < 0.05 * analytic.max()
    assert abs((soft * xs).sum() / soft.sum() - x0) < 1e-4  # centred on the sub-pixel point
    assert abs((soft * ys).sum() / soft.sum() - y0) < 1e-4
    assert abs(soft.sum() - 1) < 1e-5  # a real blur: mass kept, nothing quantised to k/255


def test_small_sigma_leaves_binary_labels_binary():
    pts = torch.tensor([[3.0, 2.0], [7.0, 6.0]])
    assert torch.equal(dt.gaussian_label_map(pts, 8, 16, 0.2), dt.points_to_label_map(pts, 8, 16))
    with pytest.raises(ValueError, match="sigma"):
        dt.gaussian_kernel1d(0.0)


def test_cell_targets_against_a_hand_built_tensor():
    labels = torch.zeros(1, 1, 16, 16)
    labels[0, 0, 2, 5] = 1  # cell (0, 0): one keypoint
    labels[0, 0, 1, 9] = 1  # cell (0, 1): two keypoints
    labels[0, 0, 7, 15] = 1
    labels[0, 0, 12, 10] = 0.2  # cell (1, 1): soft labels, renormalised
    labels[0, 0, 13, 11] = 0.6
    expected = torch.zeros(1, 65, 2, 2)
    expected[0, 8 * 2 + 5, 0, 0] = 1
    expected[0, 8 * 1 + 1, 0, 1] = 0.5
    expected[0, 8 * 7 + 7, 0, 1] = 0.5
    expected[0, 64, 1, 0] = 1  # cell (1, 0) is empty: dustbin
    expected[0, 8 * 4 + 2, 1, 1] = 0.25
    expected[0, 8 * 5 + 3, 1, 1] = 0.75
    targets = labels_to_cell_targets(labels)
    assert targets.shape == (1, 65, 2, 2)
    assert torch.allclose(targets, expected)
    with pytest.raises(ValueError, match="multiples of 8"):
        labels_to_cell_targets(torch.zeros(1, 1, 12, 16))


def test_cell_mask_needs_every_pixel_valid():
    mask = torch.ones(2, 1, 16, 24)
    mask[0, 0, 9, 3] = 0
    mask[1, 0, 0, 23] = 0
    cells = valid_mask_to_cells(mask)
    expected = torch.ones(2, 1, 2, 3)
    expected[0, 0, 1, 0] = 0
    expected[1, 0, 0, 2] = 0
    assert torch.equal(cells, expected)


def blobs(points, h, w, sigma=1.2):
    """(1, H, W) image of Gaussian dots at the points."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    img = torch.zeros(h, w, dtype=torch.float64)
    for x, y in points.tolist():
        img += torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    return img[None].float()


def test_labels_follow_the_image_through_homographic_augmentation():
    h, w = 120, 160
    grid = torch.stack(torch.meshgrid(torch.arange(20.0, 150.0, 22), torch.arange(15.0, 110.0, 19),
                                      indexing="xy"), -1).reshape(-1, 2)
    image = blobs(grid, h, w)
    checked = 0
    for seed in range(6):
        hom = dt.sample_pixel_homography(np.random.default_rng(seed), SYNTH_HOMOGRAPHY, h, w)
        warped, moved, mask = dt.warp_sample(image, grid, hom, erosion=2)
        labels = dt.points_to_label_map(moved, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        for x, y in moved.tolist():
            cx, cy = round(x), round(y)
            if not (4 <= cx < w - 4 and 4 <= cy < h - 4) or mask[0, cy - 4:cy + 5, cx - 4:cx + 5].min() < 1:
                continue
            assert labels[cy, cx] == 1
            win = warped[0, cy - 4:cy + 5, cx - 4:cx + 5]
            # The label sits on the warped dot: its brightest pixel and its intensity centroid.
            assert win[4, 4] >= win.max() * 0.6
            mx = float((win * xs[cy - 4:cy + 5, cx - 4:cx + 5]).sum() / win.sum())
            my = float((win * ys[cy - 4:cy + 5, cx - 4:cx + 5]).sum() / win.sum())
            assert math.hypot(mx - x, my - y) < 0.5, (seed, x, y, mx, my)
            checked += 1
    assert checked > 60


def test_valid_mask_erosion_follows_the_warped_border():
    shift = np.array([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]])  # 10 px to the right
    image = torch.rand(1, 24, 40)
    _, _, mask0 = dt.warp_sample(image, torch.zeros(0, 2), shift, erosion=0)
    _, _, mask2 = dt.warp_sample(image, torch.zeros(0, 2), shift, erosion=2)
    expected0 = torch.ones(1, 24, 40)
    expected0[..., :10] = 0
    expected2 = torch.ones(1, 24, 40)
    expected2[..., :12] = 0  # the warped border moves 2 px in; the image's own edges are not eroded
    assert torch.equal(mask0, expected0) and torch.equal(mask2, expected2)
    _, _, ident = dt.warp_sample(image, torch.zeros(0, 2), np.eye(3), erosion=3)
    assert torch.equal(ident, torch.ones(1, 24, 40))


def test_warp_sample_keeps_only_points_inside_the_image():
    pts = torch.tensor([[5.0, 5.0], [35.0, 5.0]])
    shift = np.array([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]])
    _, moved, _ = dt.warp_sample(torch.rand(1, 24, 40), pts, shift)
    assert torch.equal(moved, torch.tensor([[15.0, 5.0]]))


def test_warped_pair_is_consistent_with_its_homography():
    h, w = 48, 64
    pts = torch.tensor([[10.0, 12.0], [30.5, 20.25], [50.0, 40.0], [32.0, 24.0]])
    image = blobs(pts, h, w)
    pair = dt.warped_pair(image, pts, SYNTH_HOMOGRAPHY, np.random.default_rng(3), erosion=3)
    assert set(pair) == {"warped_img", "warped_points", "warped_labels", "warped_res", "warped_valid_mask",
                         "homographies", "inv_homographies"}
    for key, shape in [("warped_img", (1, h, w)), ("warped_labels", (1, h, w)), ("warped_res", (2, h, w)),
                       ("warped_valid_mask", (1, h, w)), ("homographies", (3, 3)), ("inv_homographies", (3, 3))]:
        assert pair[key].shape == shape and pair[key].dtype == torch.float32, key
    hom = pair["homographies"]
    assert torch.allclose(hom @ pair["inv_homographies"], torch.eye(3), atol=1e-5)
    expected = warp_points(pts.double(), hom.double())
    inside = (expected[:, 0] > -0.5) & (expected[:, 0] < w - 0.5) & (expected[:, 1] > -0.5) & (expected[:, 1] < h - 0.5)
    assert torch.allclose(pair["warped_points"], expected[inside].float(), atol=1e-3)
    assert torch.allclose(pair["warped_img"], warp_image(image[None], hom)[0], atol=1e-4)
    assert pair["warped_labels"].sum() == len(pair["warped_points"])


def test_warped_pair_from_the_unaugmented_image_composes_homographies():
    h, w = 48, 64
    pts = torch.tensor([[20.0, 16.0], [40.0, 30.0]])
    image = blobs(pts, h, w, sigma=3.0)
    base = np.array([[1.0, 0, 3], [0, 1, -2], [0, 0, 1]])
    plain = dt.warped_pair(image, pts, SYNTH_HOMOGRAPHY, np.random.default_rng(8))
    composed = dt.warped_pair(image, pts, SYNTH_HOMOGRAPHY, np.random.default_rng(8), base_homography=base)
    assert torch.equal(plain["homographies"], composed["homographies"])  # H still maps sample -> warped
    hom = composed["homographies"].double() @ torch.from_numpy(base)
    assert torch.allclose(composed["warped_points"], warp_points(pts.double(), hom).float(), atol=1e-3)
    twice = warp_image(warp_image(image[None], torch.from_numpy(base)), plain["homographies"])[0]
    interior = composed["warped_valid_mask"].bool() & (twice > 0.05)
    assert (composed["warped_img"] - twice)[interior].abs().max() < 0.05  # one interpolation vs two
