"""Geometry: round trips, known transforms, image/point warp agreement, masks, homography sampling."""
import math

import numpy as np
import pytest
import torch

from utils import geometry as G


def random_homography(rng, params=None):
    return G.sample_homography(rng, params or {"patch_ratio": 0.8, "perspective_amplitude_x": 0.2,
                                              "perspective_amplitude_y": 0.2, "scaling_amplitude": 0.2})


def test_warp_points_known_transforms(device):
    pts = torch.tensor([[0.0, 0.0], [10.0, 5.0], [-3.0, 7.5]], device=device, dtype=torch.float64)
    translate = torch.tensor([[1, 0, 4.0], [0, 1, -2.0], [0, 0, 1]], device=device, dtype=torch.float64)
    assert torch.allclose(G.warp_points(pts, translate), pts + torch.tensor([4.0, -2.0], device=device))
    # Projective: H = [[1,0,0],[0,1,0],[0.1,0,1]] maps (x, y) to (x, y) / (0.1 x + 1).
    proj = torch.tensor([[1, 0, 0.0], [0, 1, 0.0], [0.1, 0, 1]], device=device, dtype=torch.float64)
    expected = pts / (0.1 * pts[:, :1] + 1)
    assert torch.allclose(G.warp_points(pts, proj), expected)
    # Batched homographies broadcast over the points' leading dimension.
    both = torch.stack([translate, proj])
    out = G.warp_points(pts[None].expand(2, -1, -1), both)
    assert out.shape == (2, 3, 2) and torch.allclose(out[1], expected)


def test_normalize_denormalize_round_trip_and_corners():
    rng = np.random.default_rng(0)
    hn = random_homography(rng)
    hp = G.denormalize_homography(hn, 240, 320)
    assert np.allclose(G.normalize_homography(hp, 240, 320), hn)
    # Pixel centres of the corners are at +-1 in normalised coordinates.
    t = G.normalization_matrix(240, 320).numpy()
    corners = np.array([[0, 0, 1], [319, 239, 1]], dtype=np.float64)
    assert np.allclose((t @ corners.T).T[:, :2], [[-1, -1], [1, 1]])
    # The pixel homography moves pixel points as the normalised one moves normalised points.
    p = np.array([[100.0, 50.0]])
    pn = (t @ np.array([100.0, 50.0, 1]))[:2][None]
    via_norm = G.warp_points_np(pn, hn)
    back = (np.linalg.inv(t) @ np.append(via_norm[0], 1))[:2]
    assert np.allclose(G.warp_points_np(p, hp)[0], back)


def test_scale_homography_matches_resized_points():
    rng = np.random.default_rng(1)
    h = G.denormalize_homography(random_homography(rng), 600, 800)
    s1, s2 = (320 / 800, 240 / 600), (0.5, 0.25)
    hs = G.scale_homography(h, s1, s2)
    p = np.array([[123.0, 456.0], [700.0, 10.0]])
    resize = lambda q, s: (q + 0.5) * np.array(s) - 0.5  # noqa: E731
    assert np.allclose(G.warp_points_np(resize(p, s1), hs), resize(G.warp_points_np(p, h), s2))


def test_warp_image_moves_a_dot_where_warp_points_says(device):
    rng = np.random.default_rng(2)
    h, w = 60, 80
    hom = torch.from_numpy(G.denormalize_homography(random_homography(rng), h, w)).to(device)
    image = torch.zeros(1, 1, h, w, device=device)
    src = torch.tensor([[40.0, 30.0]], device=device, dtype=torch.float64)
    dst = G.warp_points(src, hom)[0]
    # Gaussian blob so that bilinear sampling gives a clean centroid.
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    image[0, 0] = torch.exp(-((xs - 40.0) ** 2 + (ys - 30.0) ** 2) / (2 * 2.0 ** 2))
    warped = G.warp_image(image, hom)[0, 0].double()
    weights = warped * (warped > 0.2 * warped.max())
    centroid = torch.stack([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
    assert torch.allclose(centroid, dst, atol=0.35)


def test_warp_image_identity_and_inverse_round_trip(device):
    image = torch.rand(2, 3, 16, 24, device=device)
    eye = torch.eye(3, device=device, dtype=torch.float64)
    assert torch.allclose(G.warp_image(image, eye), image, atol=1e-5)
    shift = torch.tensor([[1, 0, 3.0], [0, 1, 2.0], [0, 0, 1]], device=device, dtype=torch.float64)
    out = G.warp_image(image, shift)
    assert torch.allclose(out[:, :, 2:, 3:], image[:, :, :-2, :-3], atol=1e-5)
    assert out[:, :, :2].abs().max() < 1e-5 and out[:, :, :, :3].abs().max() < 1e-5
    back = G.warp_image(out, torch.linalg.inv(shift))
    assert torch.allclose(back[:, :, :-2, :-3], image[:, :, :-2, :-3], atol=1e-5)


def test_valid_mask_translation_and_erosion():
    shift = torch.tensor([[1, 0, 5.0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    mask = G.valid_mask((20, 30), shift)[0, 0]
    assert mask[:, :5].sum() == 0 and mask[:, 5:].min() == 1
    eroded = G.valid_mask((20, 30), shift, erosion_radius=2)[0, 0]
    # Only the boundary with the invalid region is eroded, not the image edge.
    assert eroded[:, :7].sum() == 0 and eroded[:, 7:].min() == 1
    assert torch.equal(G.valid_mask((20, 30), torch.eye(3, dtype=torch.float64), erosion_radius=3)[0, 0],
                       torch.ones(20, 30))


def test_disc_kernel_shape():
    k = G.disc_kernel(2)
    assert k.shape == (5, 5) and k.sum() == 13  # radius-2 disc on the integer grid


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_erosion_matches_scipy_on_every_path(radius):
    """Both erosions (OpenCV on the CPU, the convolution elsewhere) equal scipy's binary erosion by the
    same disc with the outside counted as valid."""
    from scipy import ndimage
    rng = np.random.default_rng(radius)
    masks = rng.random((3, 1, 24, 31)) > 0.15
    masks[1, 0, 5:20, 4:25] = True  # a solid block, so that something survives a wide erosion
    disc = G.disc_kernel(radius).numpy().astype(bool)
    expected = np.stack([ndimage.binary_erosion(m[0], structure=disc, border_value=1)[None] for m in masks])
    tensor = torch.from_numpy(masks).float()
    assert expected.any() and not expected.all()
    assert np.array_equal(G.erode_mask(tensor, radius).numpy(), expected)
    assert np.array_equal(G._erode_by_convolution(tensor, radius).numpy(), expected)


def test_sampling_grid_matches_the_float64_point_warp():
    """The grid of every destination pixel is its preimage warp_points(pixel, H^-1), computed in float64,
    in the source's normalised coordinates; inside_grid agrees with inside_image on the pixel preimages."""
    homs = G.denormalize_homography(G.sample_homographies(4, np.random.default_rng(11), {"allow_artifacts": True}),
                                    40, 56)
    homs = torch.as_tensor(homs)
    got = G.sampling_grid(homs, (40, 56))
    grid = G.pixel_grid(40, 56, dtype=torch.float64).reshape(1, -1, 2)
    preimages = G.warp_points(grid, torch.linalg.inv(homs)).reshape(4, 40, 56, 2)
    expected = preimages * torch.tensor([2 / 55, 2 / 39], dtype=torch.float64) - 1
    assert got.shape == (4, 40, 56, 2) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=0)
    inside = G.inside_image(preimages, 40, 56)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(G.inside_grid(got, 40, 56), inside)


def test_sampled_homography_corners_stay_inside_without_artifacts():
    rng = np.random.default_rng(3)
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], dtype=np.float64)
    for _ in range(50):
        hn = G.sample_homography(rng, {"patch_ratio": 0.7, "max_angle": math.pi / 4})
        # The warped image shows a patch of the original: its corners map back inside [-1, 1].
        back = G.warp_points_np(corners, np.linalg.inv(hn))
        assert np.all(np.abs(back) <= 1 + 1e-9)


def test_sample_homography_patch_ratio_one_without_motion_is_identity():
    rng = np.random.default_rng(4)
    params = {"patch_ratio": 1.0, "perspective": False, "scaling": False, "translation": False, "rotation": False}
    assert np.allclose(G.sample_homography(rng, params), np.eye(3))
    hs = G.sample_homographies(4, rng, {"patch_ratio": 0.5}, identity_first=True)
    assert hs.shape == (4, 3, 3) and np.allclose(hs[0], np.eye(3)) and not np.allclose(hs[1], np.eye(3))
    with pytest.raises(KeyError, match="unknown homography parameter 'patch_ration'"):
        G.sample_homography(rng, {"patch_ration": 0.5})


def test_sample_homography_is_deterministic_for_a_seed():
    a = G.sample_homographies(5, np.random.default_rng(7), {"allow_artifacts": True})
    b = G.sample_homographies(5, np.random.default_rng(7), {"allow_artifacts": True})
    assert np.array_equal(a, b)


def test_inside_image_bounds():
    pts = torch.tensor([[-0.5, 0.0], [-0.51, 0.0], [9.49, 4.0], [9.5, 4.0]])
    assert G.inside_image(pts, 5, 10).tolist() == [True, False, True, False]
