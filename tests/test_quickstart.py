"""`make quickstart`: the built-in sequences have the homographies they claim, and every stage runs."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets import builtin
from datasets.patches_dataset import PatchesDataset
from pipeline import quickstart


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float64)


def _correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def sequences(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin") / "HPatches"
    images = builtin.builtin_images()
    builtin.write_sequences(root, ["astronaut", "coffee"], images, seed=3)
    return root


def test_split_keeps_evaluation_images_out_of_training():
    train, evaluation = builtin.split_images(builtin.builtin_images())
    assert set(evaluation) == set(builtin.EVAL_IMAGES)
    assert not set(train) & set(evaluation)
    assert len(train) >= 10


def test_viewpoint_sequences_follow_their_homographies(sequences):
    for seq in ("v_astronaut", "v_coffee"):
        reference = _read(sequences / seq / "1.ppm")
        h, w = reference.shape
        homographies = [np.loadtxt(sequences / seq / f"H_1_{k}") for k in range(2, 7)]
        for k, homography in enumerate(homographies, start=2):
            view = _read(sequences / seq / f"{k}.ppm")
            warped = cv2.warpPerspective(reference, homography, (w, h))
            inside = cv2.warpPerspective(np.ones_like(reference), homography, (w, h)) > 0.99
            inside = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert inside.mean() > 0.5
            # The claimed homography explains the view (up to the mild photometric change) ...
            assert _correlation(warped, view, inside) > 0.9, (seq, k)
            # ... and another view's homography does not.
            other = homographies[(k - 1) % 5]
            wrong = cv2.warpPerspective(reference, other, (w, h))
            assert _correlation(wrong, view, inside) < 0.8, (seq, k)


def test_illumination_sequences_keep_the_geometry(sequences):
    reference = _read(sequences / "i_astronaut" / "1.ppm")
    for k in range(2, 7):
        np.testing.assert_allclose(np.loadtxt(sequences / "i_astronaut" / f"H_1_{k}"), np.eye(3))
        view = _read(sequences / "i_astronaut" / f"{k}.ppm")
        assert np.abs(view - reference).mean() > 2  # the illumination did change
        assert _correlation(view, reference, np.ones_like(view, bool)) > 0.85


def test_sequences_are_deterministic_and_load_as_hpatches(sequences, tmp_path):
    again = tmp_path / "HPatches"
    builtin.write_sequences(again, ["astronaut", "coffee"], builtin.builtin_images(), seed=3)
    for path in sorted(sequences.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(sequences)).read_bytes(), path
    dataset = PatchesDataset({"preprocessing": {"resize": [240, 320]}}, data_path=sequences.parent)
    assert len(dataset) == 4 * 5
    sample = dataset[5]  # first pair of the second sequence in sorted order: i_coffee
    np.testing.assert_allclose(np.asarray(sample["homography"]), np.eye(3), atol=1e-6)


def test_quickstart_smoke_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "qs"
    summary = quickstart.run_quickstart(out, "smoke", seed=0)
    assert list(summary) == ["trained", "random_init", "sift", "shipped"]  # shipped: pretrained/superpoint_mix.pth
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for row in summary.values():
        assert row["n_pairs"] == 10  # one held-out image: an i_ and a v_ sequence of 5 pairs
        assert set(row["homography_correctness"]) >= {"1", "3", "5"}
        assert 0 <= row["repeatability"] <= 1
    printed = capsys.readouterr().out
    for name in summary:
        assert f"| {name} |" in printed
    assert (out / "table.md").read_text().strip() in printed
    timings = json.loads((out / "timings.json").read_text())
    assert {"data", "magicpoint", "labels", "superpoint", "evaluation", "total"} <= set(timings)
    for stage in ("magicpoint", "labels_train", "labels_val", "superpoint", "eval_trained", "eval_sift", "eval_shipped"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    assert any((out / "runs").rglob("events.out.tfevents.*"))  # tensorboard stayed inside the output
    assert len(list((out / "logs" / "magicpoint_quick_homoAdapt" / "predictions" / "train").glob("*.npz"))) >= 10
