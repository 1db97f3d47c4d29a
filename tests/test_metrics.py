"""utils.metrics on hand-built cases: known homographies, shifted points, hand-computed AP."""
import numpy as np
import pytest

from utils import metrics


def translation(tx, ty):
    return np.array([[1.0, 0, tx], [0, 1, ty], [0, 0, 1]])


PERSPECTIVE = np.array([[0.9, 0.05, 12.0], [-0.04, 1.1, -7.0], [2e-4, -1e-4, 1.0]])


def apply_h(points, h):
    """Plain homogeneous warp written here, independent of utils.geometry."""
    p = np.c_[points, np.ones(len(points))] @ h.T
    return p[:, :2] / p[:, 2:]


# ---------------------------------------------------------------- visibility and top-k

def test_visible_mask_is_half_open_image_box_after_warp():
    pts = np.array([[0.0, 0.0], [14.9, 5.0], [15.0, 5.0], [-5.1, 5.0], [-5.0, 9.99], [3.0, 10.0]])
    # translation by +5 in x: x + 5 must lie in [0, 20), y in [0, 10)
    vis = metrics.visible_mask(pts, translation(5, 0), (10, 20))
    assert vis.tolist() == [True, True, False, False, True, False]


def test_select_top_k_keeps_best_scores_and_drops_score_column():
    pts = np.array([[1, 1, 0.2], [2, 2, 0.9], [3, 3, 0.5], [4, 4, 0.7]])
    top = metrics.select_top_k(pts, 2)
    assert top.shape == (2, 2)
    assert sorted(map(tuple, top)) == [(2, 2), (4, 4)]
    no_score = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert np.array_equal(metrics.select_top_k(no_score, 2), no_score)  # SIFT: nothing is cut


# ---------------------------------------------------------------- repeatability

def test_repeatability_translation_hand_computed():
    h = translation(5, 0)
    kp1 = np.array([[10, 10, 0.9], [20, 20, 0.8], [50, 50, 0.7], [97, 50, 0.6]])  # last maps to x=102: invisible
    kp2 = np.array([[15, 11, 0.9],     # 1.0 from warped kp1[0]
                    [25, 22.5, 0.8],   # 2.5 from warped kp1[1]
                    [55, 54, 0.7],     # 4.0 from warped kp1[2]: not repeated
                    [2, 50, 0.6]])     # maps back to x=-3: invisible in image 1
    r = metrics.repeatability(kp1, kp2, h, (100, 100))
    assert (r.n1, r.n2) == (3, 3)
    assert r.repeatability == pytest.approx(4 / 6)
    assert r.localization_error == pytest.approx((1 + 2.5 + 1 + 2.5) / 4)


def test_repeatability_threshold_is_inclusive():
    h = np.eye(3)
    kp1 = np.array([[10.0, 10.0], [40.0, 40.0]])
    kp2 = np.array([[13.0, 10.0], [40.0, 43.0001]])  # exactly 3 (counted) and just above 3 (not counted)
    r = metrics.repeatability(kp1, kp2, h, (100, 100), distance_thresh=3)
    assert r.repeatability == pytest.approx(2 / 4)
    assert r.localization_error == pytest.approx(3.0)


def test_repeatability_perspective_known_offsets():
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(20, 300, 25.0), np.arange(20, 220, 25.0))
    kp1 = np.c_[xs.ravel(), ys.ravel(), rng.random(xs.size)]
    warped = apply_h(kp1[:, :2], PERSPECTIVE)
    visible = (warped[:, 0] >= 0) & (warped[:, 0] < 320) & (warped[:, 1] >= 0) & (warped[:, 1] < 240)
    offsets = np.where(np.arange(visible.sum())[:, None] % 2 == 0, [0.6, 0.8], [1.2, 1.6])  # 1 px and 2 px
    kp2 = np.c_[warped[visible] + offsets, np.ones(visible.sum())]
    r = metrics.repeatability(kp1, kp2, PERSPECTIVE, (240, 320))
    n = int(visible.sum())
    assert (r.n1, r.n2) == (n, n)
    assert r.repeatability == pytest.approx(1.0)
    assert r.localization_error == pytest.approx(np.mean(np.linalg.norm(offsets, axis=1)))


def test_repeatability_top_k_uses_scores():
    h = np.eye(3)
    kp1 = np.array([[10, 10, 0.9], [50, 50, 0.1], [80, 80, 0.8]])
    kp2 = np.array([[10, 10, 0.9], [50, 50, 0.9], [80, 80, 0.9]])
    r = metrics.repeatability(kp1, kp2, h, (100, 100), keep_k_points=2)
    # kp1 keeps (10,10) and (80,80); kp2 keeps two of its three tied points
    assert (r.n1, r.n2) == (2, 2)


@pytest.mark.parametrize("n1,n2", [(0, 3), (3, 0), (0, 0)])
def test_repeatability_empty_sets_count_as_zero(n1, n2):
    kp = np.array([[10, 10, 0.5], [20, 20, 0.5], [30, 30, 0.5]])
    r = metrics.repeatability(kp[:n1], kp[:n2], np.eye(3), (100, 100))
    assert r.repeatability == 0.0 and r.localization_error == -1.0


def test_repeatability_nothing_repeated():
    r = metrics.repeatability(np.array([[10.0, 10.0]]), np.array([[50.0, 50.0]]), np.eye(3), (100, 100))
    assert r.repeatability == 0.0 and r.localization_error == -1.0


# ---------------------------------------------------------------- homography estimation

def test_estimate_homography_recovers_h_and_flags_outliers():
    rng = np.random.default_rng(1)
    src = rng.uniform([0, 0], [320, 240], size=(60, 2))
    dst = apply_h(src, PERSPECTIVE)
    dst[50:] += rng.uniform(30, 60, size=(10, 2))  # 10 gross outliers
    h, inliers = metrics.estimate_homography(src, dst)
    assert h is not None
    assert inliers[:50].all() and not inliers[50:].any()
    assert metrics.corner_error(h, PERSPECTIVE, (240, 320)) < 1e-3
    h2, inliers2 = metrics.estimate_homography(src, dst)  # seeded: a rerun is identical
    assert np.array_equal(h, h2) and np.array_equal(inliers, inliers2)


@pytest.mark.parametrize("src", [np.zeros((0, 2)), np.array([[0.0, 0], [10, 0], [0, 10]]),
                                 np.array([[i, i] for i in range(6)], dtype=float)])  # too few / collinear
def test_estimate_homography_failure_is_none(src):
    h, inliers = metrics.estimate_homography(src, src + 1)
    assert h is None
    assert inliers.shape == (len(src),) and not inliers.any()


def test_corner_error_and_correctness():
    shape = (240, 320)
    # an estimate off by a (3, 4) translation: every corner is 5 px away
    assert metrics.corner_error(translation(3, 4) @ PERSPECTIVE, PERSPECTIVE, shape) == pytest.approx(5.0)
    assert metrics.corner_error(PERSPECTIVE, PERSPECTIVE, shape) == 0.0
    assert metrics.homography_correctness(5.0).tolist() == [False, False, True, True, True, True]
    assert metrics.homography_correctness(0.2).tolist() == [True] * 6
    assert metrics.homography_correctness(float("nan")).tolist() == [False] * 6
    assert metrics.homography_correctness(float("inf")).tolist() == [False] * 6


def test_corner_error_uses_image_shape():
    # a scaling about the origin moves the corner (W-1, H-1) the most; two shapes give different errors
    est = np.diag([1.01, 1.01, 1.0])
    for h, w in [(240, 320), (480, 640)]:
        expected = np.mean([0, 0.01 * (h - 1), 0.01 * (w - 1), 0.01 * np.hypot(w - 1, h - 1)])
        assert metrics.corner_error(est, np.eye(3), (h, w)) == pytest.approx(expected)


# ---------------------------------------------------------------- matches, matching score

def test_correct_matches_uses_ground_truth():
    m = np.array([[10, 10, 15, 10], [10, 10, 18, 10], [10, 10, 14, 12.9]], float)
    # translation +5: errors 0, 3 (inclusive) and sqrt(1 + 8.41)
    assert metrics.correct_matches(m, translation(5, 0), 3).tolist() == [True, True, False]
    assert metrics.correct_matches(np.zeros((0, 4)), np.eye(3)).shape == (0,)


def one_hot(n, order):
    return np.eye(n, dtype=np.float32)[order]


def test_mutual_nn_matches_points_and_order():
    p1 = np.array([[1, 2, 0.5], [3, 4, 0.5], [5, 6, 0.5]])
    p2 = np.array([[7, 8, 0.5], [9, 10, 0.5]])
    d1 = one_hot(3, [0, 1, 2])
    d2 = one_hot(3, [2, 0])  # p2[0] has p1[2]'s descriptor, p2[1] has p1[0]'s
    m = metrics.mutual_nn_matches(p1, d1, p2, d2)
    assert m.idx1.tolist() == [0, 2] and m.idx2.tolist() == [1, 0]
    assert np.allclose(m.points, [[1, 2, 9, 10], [5, 6, 7, 8]])
    assert np.allclose(m.distance, 0)


def test_matching_score_hand_computed():
    h, shape = translation(5, 0), (100, 100)
    kp1 = np.array([[10, 10], [20, 20], [30, 30], [97, 40], [96.5, 60]], float)
    kp2 = np.array([[15, 10],     # right match of kp1[0]
                    [25, 25],     # kp1[1] maps to (25, 20): 5 px, wrong
                    [35, 31],     # right match of kp1[2] (1 px)
                    [2, 40],      # maps back to x=-3: invisible in image 1; kp1[3] is invisible in image 2
                    [99.5, 60]],  # 2 px from kp1[4]'s image (101.5, 60), but kp1[4] is invisible in image 2
                   float)
    desc = one_hot(5, [0, 1, 2, 3, 4])  # match i <-> i
    m = metrics.mutual_nn_matches(kp1, desc, kp2, desc)
    assert len(m.idx1) == 5
    # visible: kp1 0, 1, 2 (3 points); kp2 0, 1, 2, 4 (4 points); correct and both visible: matches 0 and 2
    assert metrics.matching_score(kp1, kp2, m, h, shape) == pytest.approx(2 * 2 / (3 + 4))


def test_matching_score_without_visible_points_is_zero():
    kp = np.array([[500.0, 500.0]])
    m = metrics.mutual_nn_matches(kp, one_hot(1, [0]), kp, one_hot(1, [0]))
    assert metrics.matching_score(kp, kp, m, np.eye(3), (100, 100)) == 0.0


def test_matching_score_compat_reproduces_reference_swap_and_truncation():
    shape = (10, 20)  # H = 10, W = 20
    kp1 = np.zeros((5, 3))
    # (x, y) -> swapped and truncated (y, x) read as (x', y'), must land in [0, 19] x [0, 9]
    kp2 = np.array([[15.7, 3.2, 1],   # -> (3, 15): y' = 15 > 9, out
                    [5.9, 8.9, 1],    # -> (8, 5): in
                    [9.99, 19.5, 1],  # -> (19, 9): in (inclusive bounds, truncation)
                    [2.0, 0.5, 1]])   # -> (0, 2): in
    assert metrics.matching_score_compat(2, kp1, kp2, np.eye(3), shape) == pytest.approx(2 * 2 / (5 + 3))
    # with H = translation(+2, 0), the points go back through H^-1: x' - 2 must be >= 0
    assert metrics.matching_score_compat(2, kp1, kp2, translation(2, 0), shape) == pytest.approx(2 * 2 / (5 + 2))
    assert metrics.matching_score_compat(0, np.zeros((0, 3)), np.zeros((0, 3)), np.eye(3), shape) == 0.0


# ---------------------------------------------------------------- average precision

def test_average_precision_hand_computed():
    labels = np.array([1, 0, 1, 1, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # precision at each positive: 1/1, 2/3, 3/4
    assert metrics.average_precision(labels, scores) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # order of the input does not matter
    perm = np.array([3, 0, 4, 2, 1])
    assert metrics.average_precision(labels[perm], scores[perm]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_average_precision_ties_form_one_threshold():
    # a positive tied with a negative: precision 1/2 whatever the input order (sklearn semantics)
    assert metrics.average_precision(np.array([True, False]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert metrics.average_precision(np.array([False, True]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    # thresholds 0.9 (P=1, R=1/2) and 0.5 (P=2/3, R=1)
    labels = np.array([1, 0, 1, 0], bool)
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_edge_cases():
    assert metrics.average_precision(np.ones(4, bool), np.array([0.1, 0.5, 0.5, 0.2])) == pytest.approx(1.0)
    assert metrics.average_precision(np.zeros(4, bool), np.arange(4.0)) == 0.0
    assert metrics.average_precision(np.zeros(0, bool), np.zeros(0)) == 0.0
    # the single positive ranked last of 4 distinct scores
    assert metrics.average_precision(np.array([0, 0, 0, 1], bool), np.array([4, 3, 2, 1.0])) == pytest.approx(0.25)


def test_average_precision_matches_per_positive_definition_with_ties():
    """Second method: AP = mean over positives of precision at that positive's score threshold."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        scores = np.round(rng.random(n), 1)  # many ties
        labels = rng.random(n) < 0.4
        if not labels.any():
            continue
        expected = np.mean([np.sum(labels & (scores >= s)) / np.sum(scores >= s) for s in scores[labels]])
        assert metrics.average_precision(labels, scores) == pytest.approx(expected)


def test_nn_map_ranks_by_distance():
    # closest first: 0.1 (T), 0.3 (T), 0.5 (F)
    assert metrics.nn_map(np.array([True, False, True]), np.array([0.1, 0.5, 0.3])) == pytest.approx(1.0)
    # 0.1 (F), 0.3 (T), 0.5 (F): precision 1/2 at the only positive
    assert metrics.nn_map(np.array([False, False, True]), np.array([0.1, 0.5, 0.3])) == pytest.approx(0.5)
    assert metrics.nn_map(np.zeros(0, bool), np.zeros(0)) == 0.0
    assert metrics.nn_map(np.zeros(3, bool), np.array([0.1, 0.2, 0.3])) == 0.0
