"""Keypoint post-processing: heatmap layout, NMS (vs a plain greedy implementation), borders, top-k,
sub-pixel refinement and descriptor sampling, against hand-computed values."""
import numpy as np
import pytest
import torch

from utils.keypoints import (extract_keypoints, heatmap_to_cells, logits_to_heatmap, nms, remove_borders,
                             sample_descriptors, soft_argmax_refine)


def greedy_nms(heatmap: np.ndarray, radius: int, threshold: float) -> set:
    """MagicLeap's nms_fast, written plainly: visit by decreasing score (ties in raster order), keep a
    point unless a kept point lies within Chebyshev distance `radius`."""
    ys, xs = np.nonzero(heatmap >= threshold)
    scores = heatmap[ys, xs]
    order = np.lexsort((ys * heatmap.shape[1] + xs, -scores))  # score desc, then raster index
    h, w = heatmap.shape
    grid = np.zeros((h + 2 * radius, w + 2 * radius), dtype=np.int8)
    grid[ys + radius, xs + radius] = 1
    kept = set()
    for i in order:
        y, x = ys[i] + radius, xs[i] + radius
        if grid[y, x] == 1:
            grid[y - radius:y + radius + 1, x - radius:x + radius + 1] = 0
            grid[y, x] = -1
            kept.add((int(xs[i]), int(ys[i])))
    return kept


def mask_to_set(mask: torch.Tensor) -> set:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return set(zip(xs.tolist(), ys.tolist()))


def test_logits_to_heatmap_depth_to_space_layout():
    # Channel k of cell (i, j) must land on pixel (8i + k // 8, 8j + k % 8).
    semi = torch.full((1, 65, 2, 3), -30.0)
    placements = {(0, 0, 0): (0, 0), (1, 2, 9): (9, 17), (0, 1, 63): (7, 15), (1, 0, 42): (13, 2)}
    for (i, j, k) in placements:
        semi[0, k, i, j] = 30.0
    heat = logits_to_heatmap(semi)
    assert heat.shape == (1, 16, 24)
    hot = {(int(r), int(c)) for r, c in torch.nonzero(heat[0] > 0.5).tolist()}
    assert hot == set(placements.values())
    # Cells whose maximum is the dustbin give no probability mass.
    semi2 = torch.zeros((1, 65, 1, 1))
    semi2[0, 64] = 50.0
    assert logits_to_heatmap(semi2).max() < 1e-10
    # Space-to-depth inverts depth-to-space.
    probs = torch.softmax(torch.randn(2, 65, 3, 4), 1)[:, :64]
    assert torch.equal(heatmap_to_cells(torch.nn.functional.pixel_shuffle(probs, 8)[:, 0]), probs)


@pytest.mark.parametrize("radius", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", range(4))
def test_nms_equals_greedy_on_random_heatmaps(radius, seed, device):
    rng = np.random.default_rng(seed)
    heat = rng.random((2, 40, 56)).astype(np.float32) ** 3
    got = nms(torch.from_numpy(heat).to(device), radius, 0.1)
    for b in range(2):
        assert mask_to_set(got[b].cpu()) == greedy_nms(heat[b], radius, 0.1)


def test_nms_ties_and_plateaus_follow_raster_order():
    heat = np.zeros((12, 12), np.float32)
    heat[3:6, 3:6] = 0.5  # plateau: raster order keeps (3, 3) first
    heat[9, 2] = heat[9, 4] = 0.3  # tie two apart with radius 2: the first in raster order wins
    got = mask_to_set(nms(torch.from_numpy(heat)[None], 2, 0.1)[0])
    assert got == greedy_nms(heat, 2, 0.1)
    # (3, 3) suppresses the whole 3x3 plateau; (2, 9) comes before (4, 9) and suppresses it.
    assert got == {(3, 3), (2, 9)}


def test_nms_chain_needs_several_rounds():
    # A ramp: greedy keeps every (r+1)-th pixel from the top; exercises many iterations.
    heat = np.tile(np.linspace(0.2, 1.0, 30, dtype=np.float32), (3, 1))
    got = mask_to_set(nms(torch.from_numpy(heat)[None], 2, 0.1)[0])
    assert got == greedy_nms(heat, 2, 0.1)
    assert sorted(x for x, _ in got) == [29 - 3 * k for k in range(10)][::-1]


def test_nms_on_real_heatmap(magicleap_weights, hpatches):
    import cv2
    from models.extractor import SuperPointExtractor

    image = cv2.resize(cv2.imread(str(hpatches / "v_graffiti" / "1.ppm"), 0), (320, 240), interpolation=cv2.INTER_AREA)
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained", "pretrained": str(magicleap_weights)})
    heat = extractor.heatmap(torch.from_numpy(image).float()[None, None] / 255)
    for radius in (4, 8):
        got = mask_to_set(nms(heat, radius, 0.015)[0])
        assert got == greedy_nms(heat[0].numpy(), radius, 0.015)
        assert len(got) > 100


def test_remove_borders_keeps_reference_range():
    mask = torch.ones(1, 20, 30, dtype=torch.bool)
    out = remove_borders(mask, 4)
    ys, xs = torch.nonzero(out[0], as_tuple=True)
    assert xs.min() == 4 and xs.max() == 30 - 5 and ys.min() == 4 and ys.max() == 20 - 5


def test_soft_argmax_is_score_weighted_centroid():
    heat = torch.zeros(1, 10, 10)
    heat[0, 5, 5] = 0.6
    heat[0, 5, 6] = 0.3  # pulls x by 0.3 * 1 / 1.0
    heat[0, 3, 5] = 0.1  # pulls y by 0.1 * -2 / 1.0
    out = soft_argmax_refine(heat, torch.tensor([0]), torch.tensor([[5, 5]]), patch_size=5)
    assert torch.allclose(out, torch.tensor([[5.3, 4.8]]), atol=1e-6)
    # Zero padding outside the image: a corner point only sees in-image values.
    heat2 = torch.zeros(1, 6, 6)
    heat2[0, 0, 0], heat2[0, 0, 1] = 1.0, 1.0
    out2 = soft_argmax_refine(heat2, torch.tensor([0]), torch.tensor([[0, 0]]), patch_size=5)
    assert torch.allclose(out2, torch.tensor([[0.5, 0.0]]))


def test_extract_keypoints_sorting_topk_and_batches():
    heat = torch.zeros(2, 40, 40)
    pts = {0: [(10, 10, 0.9), (20, 12, 0.5), (30, 30, 0.7)], 1: [(15, 25, 0.4)]}
    for b, items in pts.items():
        for x, y, s in items:
            heat[b, y, x] = s
    heat[0, 2, 2] = 0.99  # inside the border: removed
    out = extract_keypoints(heat, threshold=0.1, nms_radius=4, border=4)
    assert out[0][0].tolist() == [[10, 10], [30, 30], [20, 12]]
    assert torch.allclose(out[0][1], torch.tensor([0.9, 0.7, 0.5]))
    assert out[1][0].tolist() == [[15, 25]]
    top = extract_keypoints(heat, threshold=0.1, nms_radius=4, border=4, top_k=2)
    assert top[0][0].tolist() == [[10, 10], [30, 30]] and len(top[1][0]) == 1
    empty = extract_keypoints(torch.zeros(1, 16, 16), 0.1, 4)
    assert empty[0][0].shape == (0, 2) and empty[0][1].shape == (0,)


@pytest.mark.parametrize("seed", range(3))
def test_extract_keypoints_equals_border_removal_after_nms(seed):
    # extract_keypoints filters the NMS points by coordinates; the mask path (nms, then remove_borders)
    # is the independent expectation. A point in the border still suppresses its neighbours inside.
    rng = np.random.default_rng(seed)
    heat = torch.from_numpy(rng.random((2, 48, 64)).astype(np.float32) ** 3)
    heat[0, 2, 2], heat[0, 5, 5] = 2.0, 1.5  # (5, 5) is inside, but within radius 4 of the border point
    out = extract_keypoints(heat, threshold=0.2, nms_radius=4, border=4)
    mask = remove_borders(nms(heat, 4, 0.2), 4)
    for b in range(2):
        assert set(map(tuple, out[b][0].long().tolist())) == mask_to_set(mask[b])
        assert torch.all(out[b][1][:-1] >= out[b][1][1:])
    assert (5, 5) not in set(map(tuple, out[0][0].long().tolist()))


def test_sample_descriptors_at_cell_centres_and_between():
    # Cell (i, j) describes pixel (8j + 3.5, 8i + 3.5): at that point the sample equals the cell's vector.
    desc = torch.zeros(1, 2, 2, 3)
    desc[0, 0, :, :] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    desc[0, 1] = 1.0
    pts = torch.tensor([[[3.5, 3.5], [19.5, 11.5], [7.5, 3.5], [-10.0, -10.0]]])
    out = sample_descriptors(desc, pts)
    expected = torch.tensor([[1.0, 1.0], [6.0, 1.0], [1.5, 1.0], [1.0, 1.0]])  # midpoint, border clamp
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(out[0], expected, atol=1e-6)
