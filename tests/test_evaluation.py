"""utils.evaluation / evaluation.py end to end: synthetic predictions with known answers, the reference's
own predictions (compat mode against a straightforward transcription of the reference's formulas),
outputs, figures, bad input and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.evaluation import evaluate_predictions
from utils.io import DataError

REPO = Path(__file__).resolve().parents[1]
SHAPE = (240, 320)
H_TRUE = np.array([[0.95, 0.04, 9.0], [-0.03, 1.05, -6.0], [1.5e-4, -1e-4, 1.0]])
THRESHOLDS = ["1", "3", "5", "10", "20", "50"]


def apply_h(points, h):
    p = np.c_[points, np.ones(len(points))] @ h.T
    return p[:, :2] / p[:, 2:]


def unit(rng, n, d=32):
    v = rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def write_pair(path, kp1, desc1, kp2, desc2, h=H_TRUE):
    rng = np.random.default_rng(0)
    np.savez_compressed(path, image=rng.random(SHAPE, dtype=np.float32),
                        warped_image=rng.random(SHAPE, dtype=np.float32), prob=kp1, warped_prob=kp2,
                        desc=desc1, warped_desc=desc2, homography=h, matches=np.zeros((0, 4)))


def grid_pair(offset, n_extra=5, seed=0, with_scores=True, desc_scale=1.0, desc_noise=0.0):
    """kp1 on a 24 px grid; kp2 = the visible kp1 mapped by H_TRUE and shifted by `offset`, with the
    same descriptors, plus `n_extra` unrepeated points (mid-cell images, random descriptors).
    Returns (kp1, desc1, kp2, desc2, n_visible)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(12.0, 320, 24), np.arange(12.0, 240, 24))
    pts = np.c_[xs.ravel(), ys.ravel()]
    warped = apply_h(pts, H_TRUE)
    vis = (warped[:, 0] >= 0) & (warped[:, 0] < 320) & (warped[:, 1] >= 0) & (warped[:, 1] < 240)
    extra = apply_h(pts[(pts[:, 0] < 290) & (pts[:, 1] < 210)][:n_extra] + 12, H_TRUE)
    desc1 = unit(rng, len(pts)) * desc_scale
    desc2 = np.r_[desc1[vis] + desc_noise * unit(rng, int(vis.sum())), unit(rng, n_extra) * desc_scale]
    kp2 = np.r_[warped[vis] + offset, extra]
    if with_scores:
        pts = np.c_[pts, rng.random(len(pts))]
        kp2 = np.c_[kp2, rng.random(len(kp2))]
    return pts, desc1.astype(np.float32), kp2, desc2.astype(np.float32), int(vis.sum())


@pytest.fixture
def synthetic(tmp_path):
    """0: 0.5 px offsets; 1: 4 px offsets; 2: three points only; 10: no point in image 2;
    3: a corrupt file; plus files that are not predictions."""
    kp1, d1, kp2, d2, n_vis = grid_pair((0.3, 0.4))
    write_pair(tmp_path / "0.npz", kp1, d1, kp2, d2)
    write_pair(tmp_path / "1.npz", *grid_pair((2.4, 3.2))[:4])
    small = np.array([[50, 50, 0.9], [150, 60, 0.8], [100, 150, 0.7]])
    warped_small = np.c_[apply_h(small[:, :2], H_TRUE) + (0.3, 0.4), small[:, 2]]
    desc_small = unit(np.random.default_rng(5), 3)
    write_pair(tmp_path / "2.npz", small, desc_small, warped_small, desc_small)
    write_pair(tmp_path / "10.npz", small, desc_small, np.zeros((0, 3)), np.zeros((0, 32), np.float32))
    (tmp_path / "3.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp_path / "index.json").write_text("[]")
    (tmp_path / "notes.npz").write_bytes(b"ignored: not <int>.npz")
    return tmp_path, n_vis, len(kp2) - n_vis


def test_synthetic_pairs_give_the_expected_metrics(synthetic):
    folder, v, e = synthetic
    res = evaluate_predictions(folder, repeatability=True, homography=True)
    rep_a = 2 * v / (2 * v + e)  # every visible point repeated; the extras are not
    assert res["n_pairs"] == 4 and res["n_failed"] == 1
    assert res["failed_files"][0]["file"] == "3.npz" and "3.npz" in res["failed_files"][0]["error"]
    assert res["repeatability"] == pytest.approx((rep_a + 0 + 1 + 0) / 4)
    assert res["localization_err"] == pytest.approx(0.5)  # pairs 0 and 2 (0.5 px); 1 and 10 have none
    assert res["n_localization_pairs"] == 2
    # corner errors: 0.5 (pair 0), 4 (pair 1); pairs 2 (3 matches) and 10 (no point) fail
    expected = {"1": 0.25, "3": 0.25, "5": 0.5, "10": 0.5, "20": 0.5, "50": 0.5}
    assert res["homography_correctness"] == pytest.approx(expected)
    assert list(res["homography_correctness"]) == THRESHOLDS
    assert res["n_homography_failed"] == 2 and res["homography_failed_files"] == ["2.npz", "10.npz"]
    # AUC of the recall curve through (0, 0), (0.5, 1/4), (4, 2/4), flat after (failures never recalled):
    # @1: (0.5 * 0.25 / 2 + 0.5 * 0.25) / 1; @3: (0.0625 + 2.5 * 0.25) / 3; @5: (0.0625 + 3.5 * 0.75 / 2 + 0.5) / 5
    assert res["homography_auc"] == pytest.approx({"1": 0.1875, "3": 0.6875 / 3, "5": 0.375}, abs=1e-4)
    # matching score: right matches of pair 0 cover every visible point but the extras; pair 2: all
    assert res["mscore"] == pytest.approx((2 * v / (v + v + e) + 0 + 1 + 0) / 4)
    assert res["mAP"] == pytest.approx((1 + 0 + 1 + 0) / 4)

    npz = np.load(folder / "result.npz")
    assert set(npz.files) == {"repeatability", "localization_err", "correctness", "homography_thresh",
                              "mscore", "mAP"}
    assert np.allclose(npz["repeatability"], [rep_a, 0, 1, 0])  # numeric file order: 0, 1, 2, 10
    assert np.allclose(npz["localization_err"], [0.5, 0.5])
    assert npz["correctness"].dtype == bool and npz["correctness"].tolist() == [
        [True] * 6, [False, False, True, True, True, True], [False] * 6, [False] * 6]
    assert npz["homography_thresh"].tolist() == [1, 3, 5, 10, 20, 50]
    assert np.allclose(npz["mAP"], [1, 0, 1, 0])

    saved = json.loads((folder / "result.json").read_text())
    for key in ["repeatability", "localization_err", "homography_correctness", "homography_auc", "mscore", "mAP",
                "n_pairs", "n_failed"]:
        assert saved[key] == res[key]
    text = (folder / "result.txt").read_text()
    assert "repeatability: " in text and "nn mean AP: " in text and "file: 3.npz; FAILED" in text


def test_rerun_is_identical_and_result_txt_is_appended(synthetic):
    folder = synthetic[0]
    first = evaluate_predictions(folder, repeatability=True, homography=True)
    npz1 = dict(np.load(folder / "result.npz"))
    second = evaluate_predictions(folder, repeatability=True, homography=True)
    npz2 = dict(np.load(folder / "result.npz"))
    assert first == second
    assert all(np.array_equal(npz1[k], npz2[k]) for k in npz1)
    assert (folder / "result.txt").read_text().count("====== details =====") == 2


def test_repeatability_alone_leaves_homography_keys_null(synthetic):
    folder = synthetic[0]
    res = evaluate_predictions(folder, repeatability=True)
    assert res["repeatability"] is not None
    for key in ["homography_correctness", "mscore", "mAP"]:
        assert res[key] is None
    saved = json.loads((folder / "result.json").read_text())
    assert saved["homography_correctness"] is None and saved["mAP"] is None
    npz = np.load(folder / "result.npz")
    assert npz["correctness"].shape == (0, 6) and npz["mAP"].shape == (0,)


def test_figures(synthetic):
    folder = synthetic[0]
    evaluate_predictions(folder, repeatability=True, homography=True, output_images=True, plot_matching=True)
    for i in ["0", "1", "2", "10"]:
        for rel in [f"repeatibility3/{i}.png", f"warping/{i}.png", f"matching/{i}cv.png", f"matching/{i}m.png"]:
            image = cv2.imread(str(folder / rel))
            assert image is not None, rel
    rep = cv2.imread(str(folder / "repeatibility3/0.png"))
    assert rep.shape[1] == 2 * SHAPE[1] + 4 and rep.shape[0] > SHAPE[0]  # two panels and a title
    assert cv2.imread(str(folder / "warping/0.png")).shape[1] == 3 * SHAPE[1] + 8
    assert not (folder / "repeatibility3" / "3.png").exists()  # the corrupt file has no figure


def test_plot_matching_alone(synthetic):
    folder = synthetic[0]
    res = evaluate_predictions(folder, plot_matching=True)
    assert (folder / "matching" / "0m.png").is_file() and not (folder / "warping").exists()
    assert res["homography_correctness"] is None and res["repeatability"] is None


def test_sift_mode_uses_every_cross_check_match(tmp_path):
    # SIFT-like: no score column, descriptors far from unit norm (matched ones ~5 apart)
    kp1, d1, kp2, d2, v = grid_pair((0.3, 0.4), with_scores=False, desc_scale=200.0, desc_noise=5.0)
    write_pair(tmp_path / "0.npz", kp1, d1, kp2, d2)
    sift = evaluate_predictions(tmp_path, repeatability=True, homography=True, sift=True)
    assert sift["mAP"] == pytest.approx(1.0)
    assert sift["homography_correctness"]["1"] == 1.0
    plain = evaluate_predictions(tmp_path, repeatability=True, homography=True)
    assert plain["mAP"] == 0.0  # no match closer than 1.2: the unit-descriptor threshold does not fit SIFT


def test_bad_shapes_are_counted_failures(tmp_path):
    kp1, d1, kp2, d2, _ = grid_pair((0.3, 0.4))
    write_pair(tmp_path / "0.npz", kp1, d1, kp2, d2)
    write_pair(tmp_path / "1.npz", kp1, d1[:-1], kp2, d2)
    write_pair(tmp_path / "2.npz", kp1, d1, kp2, d2, h=np.zeros((3, 3)))
    res = evaluate_predictions(tmp_path, homography=True)
    assert res["n_pairs"] == 1 and res["n_failed"] == 2
    errors = {f["file"]: f["error"] for f in res["failed_files"]}
    assert "'desc'" in errors["1.npz"] and "'homography'" in errors["2.npz"]


def test_missing_empty_or_unreadable_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        evaluate_predictions(tmp_path / "nowhere", repeatability=True)
    with pytest.raises(DataError, match="no predictions"):
        evaluate_predictions(tmp_path, repeatability=True)
    (tmp_path / "0.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="0.npz"):
        evaluate_predictions(tmp_path, repeatability=True)


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "evaluation.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_missing_folder_exits_nonzero_naming_it(tmp_path):
    missing = tmp_path / "no_such_predictions"
    proc = run_cli(missing, "-r")
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


def test_cli_prints_the_seven_numbers(synthetic):
    folder = synthetic[0]
    proc = run_cli(folder, "--repeatibility", "--homography", "--compat")
    assert proc.returncode == 0, proc.stderr
    assert "| eps=1 | eps=3 | eps=5 | Rep | MLE | NN mAP | M.score | AUC@1 | AUC@3 | AUC@5 |" in proc.stdout
    assert "files failed: 1" in proc.stdout and "3.npz" in proc.stderr
    saved = json.loads((folder / "result.json").read_text())
    assert saved["flags"]["compat"] is True
    assert f"| {saved['homography_correctness']['1']:.3f} |" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"| {saved['homography_auc']['5']:.3f} |")


# ---------------------------------------------------------------- the reference's own predictions

def reference_formulas(data, top_k=1000, thresh=3):
    """The reference's evaluation of one pair, transcribed directly (its evaluation.py
    with --repeatibility --homography): returns rep, loc_err, correctness (6,), mscore, ap."""
    shape = data["image"].shape
    hh, ww = shape
    h = data["homography"]

    def warp(p, m):
        q = np.c_[p, np.ones(len(p))] @ m.T
        return q[:, :2] / q[:, 2:]

    def inside(p):
        return (p[:, 0] >= 0) & (p[:, 0] < ww) & (p[:, 1] >= 0) & (p[:, 1] < hh)

    def k_best(p):
        return p[p[:, 2].argsort(), :2][-min(top_k, len(p)):]

    # 7.2 repeatability / localization error
    kp = data["prob"].copy()
    wkp = data["warped_prob"].copy()
    wkp = k_best(wkp[inside(warp(wkp[:, :2], np.linalg.inv(h)))])
    kp[:, :2] = warp(kp[:, :2], h)
    kp = k_best(kp[inside(kp[:, :2])])
    norm = np.linalg.norm(kp[:, None] - wkp[None], axis=2)
    min1, min2 = norm.min(axis=1), norm.min(axis=0)
    c1, c2 = np.sum(min1 <= thresh), np.sum(min2 <= thresh)
    rep = (c1 + c2) / (len(kp) + len(wkp)) if c1 + c2 else 0
    loc = (min1[min1 <= thresh].sum() + min2[min2 <= thresh].sum()) / (c1 + c2) if c1 + c2 else -1

    # 7.3 homography: cross-check matches, RANSAC, 4 corners
    cv_matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(data["desc"], data["warped_desc"])
    q = np.array([m.queryIdx for m in cv_matches])
    t = np.array([m.trainIdx for m in cv_matches])
    cv2.setRNGSeed(0)
    h_est, inliers = cv2.findHomography(data["prob"][q, :2], data["warped_prob"][t, :2], cv2.RANSAC)
    corners = np.array([[0, 0], [0, hh - 1], [ww - 1, 0], [ww - 1, hh - 1]], float)
    mean_dist = np.mean(np.linalg.norm(warp(corners, h) - warp(corners, h_est), axis=1))
    correctness = mean_dist <= np.array([1, 3, 5, 10, 20, 50])

    # 7.4 matching score with the (y, x) swap, truncation and float32 warp of the reference
    pnts = np.trunc(data["warped_prob"][:, [1, 0]]).astype(np.float32)
    back = np.c_[pnts, np.ones(len(pnts), np.float32)] @ np.linalg.inv(h).astype(np.float32).T
    back = back[:, :2] / back[:, 2:]
    n_back = np.sum(np.all((back >= 0) & (back <= np.array([ww - 1, hh - 1], np.float32)), axis=1))
    mscore = inliers.sum() * 2 / (len(data["prob"]) + n_back)

    # 7.5 NN mAP: PointTracker matching (nn_thresh 1.2) on (y, x) points, RANSAC labels, AP
    dmat = np.sqrt(2 - 2 * np.clip(data["desc"] @ data["warped_desc"].T, -1, 1))
    idx = np.argmin(dmat, axis=1)
    scores = dmat[np.arange(len(idx)), idx]
    keep = (scores < 1.2) & (np.argmin(dmat, axis=0)[idx] == np.arange(len(idx)))
    yx1, yx2 = data["prob"][:, [1, 0]], data["warped_prob"][:, [1, 0]]
    matches = np.c_[yx1[keep], yx2[idx[keep]]]
    cv2.setRNGSeed(0)
    _, labels = cv2.findHomography(matches[:, [0, 1]], matches[:, [2, 3]], cv2.RANSAC)
    labels = labels.ravel().astype(bool)
    flip = scores[keep].max() - scores[keep]
    ap = 0.0
    if labels.any():  # AP as the sum over distinct thresholds of precision x recall gain
        for s in np.unique(flip)[::-1]:
            at = flip == s
            ap += np.sum(labels & (flip >= s)) / np.sum(flip >= s) * np.sum(labels & at) / labels.sum()
    return rep, loc, correctness, mscore, ap


@pytest.fixture
def reference_copy(reference_predictions, tmp_path):
    """The reference's predictions linked into a writable folder (results are written beside them)."""
    for f in reference_predictions.glob("*.npz"):
        (tmp_path / f.name).symlink_to(f)
    return tmp_path


def test_reference_predictions_compat_equals_reference_formulas(reference_copy):
    res = evaluate_predictions(reference_copy, repeatability=True, homography=True, compat=True)
    assert res["n_pairs"] == 7 and res["n_failed"] == 1
    assert res["failed_files"][0]["file"] == "7.npz"
    ours = np.load(reference_copy / "result.npz")
    expected = [reference_formulas(dict(np.load(reference_copy / f"{i}.npz"))) for i in range(7)]
    rep, loc, corr, msc, ap = (np.array(v) for v in zip(*expected))
    np.testing.assert_allclose(ours["repeatability"], rep, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["localization_err"], loc[loc > 0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours["correctness"], corr)
    np.testing.assert_allclose(ours["mscore"], msc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["mAP"], ap, rtol=0, atol=1e-9)
    assert res["homography_correctness"] == pytest.approx(dict(zip(THRESHOLDS, corr.mean(axis=0))))
    assert res["mscore"] == pytest.approx(msc.mean()) and res["mAP"] == pytest.approx(ap.mean())


def test_reference_predictions_default_definitions(reference_copy):
    compat = evaluate_predictions(reference_copy, repeatability=True, homography=True, compat=True)
    res = evaluate_predictions(reference_copy, repeatability=True, homography=True)
    assert res["n_pairs"] == 7 and res["n_failed"] == 1
    # repeatability and homography estimation have one definition; the matching score differs
    for key in ["repeatability", "localization_err", "homography_correctness"]:
        assert res[key] == compat[key]
    assert res["mscore"] != pytest.approx(compat["mscore"])
    assert 0 < res["mscore"] <= 1 and 0 < res["mAP"] <= 1
