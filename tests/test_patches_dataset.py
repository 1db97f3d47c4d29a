"""HPatches loader: protocol, homography adjustment per image, order, alteration, bad input."""
import cv2
import numpy as np
import pytest

from datasets.patches_dataset import PatchesDataset
from utils.config import ConfigError
from utils.io import DataError


def textured(shape, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(shape[0] // 8, shape[1] // 8), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), (5, 5), 1.5)


def make_sequence(root, name, shape1=(400, 560), shape2=(480, 700), seed=0, drop=()):
    seq = root / name
    seq.mkdir(parents=True)
    image1 = textured(shape1, seed)
    cv2.imwrite(str(seq / "1.ppm"), cv2.cvtColor(image1, cv2.COLOR_GRAY2BGR))
    homographies = {}
    for k in range(2, 7):
        h = np.array([[1.1, 0.05 * k, 10.0 * k], [-0.03, 1.05, 5.0], [1e-4, 5e-5 * k, 1.0]])
        warped = cv2.warpPerspective(image1, h, (shape2[1], shape2[0]), flags=cv2.INTER_LINEAR)
        if f"{k}.ppm" not in drop:
            cv2.imwrite(str(seq / f"{k}.ppm"), cv2.cvtColor(warped, cv2.COLOR_GRAY2BGR))
        if f"H_1_{k}" not in drop:
            np.savetxt(seq / f"H_1_{k}", h)
        homographies[k] = h
    return homographies


def test_homography_is_adjusted_with_each_image_scale(tmp_path):
    make_sequence(tmp_path / "HPatches", "v_test")
    ds = PatchesDataset({"preprocessing": {"resize": [240, 320]}}, data_path=tmp_path)
    assert len(ds) == 5
    for i in (0, 4):
        sample = ds[i]
        image = (sample["image"][0].numpy() * 255).astype(np.float32)
        warped = sample["warped_image"][0].numpy() * 255
        # Independent check: OpenCV's warp of the resized image by the adjusted H gives the resized warp.
        rendered = cv2.warpPerspective(image, sample["homography"].numpy(), (320, 240), flags=cv2.INTER_LINEAR)
        valid = cv2.warpPerspective(np.ones_like(image), sample["homography"].numpy(), (320, 240)) > 0.99
        valid = cv2.erode(valid.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert valid.sum() > 5000
        assert np.abs(rendered - warped)[valid].mean() < 4.0  # grey levels out of 255
    assert sample["image"].shape == (1, 240, 320) and sample["image"].dtype.is_floating_point


def test_sorted_order_alteration_and_truncate(tmp_path):
    root = tmp_path / "HPatches"
    for i, name in enumerate(["v_b", "i_a", "v_a", "i_b"]):
        make_sequence(root, name, seed=i)
    ds = PatchesDataset({}, data_path=tmp_path)
    assert [p["name"] for p in ds.pairs[::5]] == ["i_a/1_2", "i_b/1_2", "v_a/1_2", "v_b/1_2"]
    assert {p["sequence"] for p in PatchesDataset({"alteration": "v"}, data_path=tmp_path).pairs} == {"v_a", "v_b"}
    assert len(PatchesDataset({"alteration": "i", "truncate": 3}, data_path=tmp_path)) == 3


def test_missing_files_are_skipped_and_reported(tmp_path):
    make_sequence(tmp_path / "HPatches", "v_x", drop=("4.ppm", "H_1_6"))
    ds = PatchesDataset({}, data_path=tmp_path)
    assert [p["name"] for p in ds.pairs] == ["v_x/1_2", "v_x/1_3", "v_x/1_5"]
    assert {name for name, _ in ds.skipped} == {"v_x/1_4", "v_x/1_6"}


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match="HPatches folder not found: .*nowhere"):
        PatchesDataset({}, data_path=tmp_path / "nowhere")
    make_sequence(tmp_path / "HPatches", "v_y")
    with pytest.raises(ConfigError, match="preprocessing.resize.*multiples of 8"):
        PatchesDataset({"preprocessing": {"resize": [241, 320]}}, data_path=tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'alterations'"):
        PatchesDataset({"alterations": "i"}, data_path=tmp_path)
    with pytest.raises(ConfigError, match="'alteration' is 'x'"):
        PatchesDataset({"alteration": "x"}, data_path=tmp_path)
    (tmp_path / "HPatches" / "v_y" / "3.ppm").write_bytes(b"garbage")
    ds = PatchesDataset({}, data_path=tmp_path)
    with pytest.raises(DataError, match="3.ppm: not a readable image"):
        ds[1]


def test_real_hpatches_pairs(hpatches):
    ds = PatchesDataset({}, data_path=hpatches.parent)
    assert [p["name"] for p in ds.pairs[:1]] == ["i_leuven_oxford/1_2"] and len(ds) == 10
    sample = ds[5]  # v_graffiti 1_2
    h = sample["homography"].numpy()
    # graffiti is 800x640: s = max(240/640, 320/800) = 0.4, crop 600x800, both axes resized by 0.4.
    original = np.loadtxt(hpatches / "v_graffiti" / "H_1_2")
    p_small = np.array([100.0, 80.0])
    p_full = (p_small + 0.5) / 0.4 - 0.5
    q_full = original @ np.append(p_full, 1)
    q_small = (q_full[:2] / q_full[2] + 0.5) * 0.4 - 0.5
    q = h @ np.append(p_small, 1)
    assert np.allclose(q[:2] / q[2], q_small, atol=1e-9)
