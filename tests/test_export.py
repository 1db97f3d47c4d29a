"""export.py export_descriptor and export_classical.py end to end on the shared HPatches sequences,
then evaluation; CLI errors."""
import json

import numpy as np
import pytest
import torch
import yaml

import export
import export_classical
import settings
from models.extractor import SuperPointExtractor
from utils.evaluation import evaluate_predictions
from utils.keypoints import sample_descriptors
from utils.matching import mutual_nearest_neighbours


@pytest.fixture
def exper(tmp_path, monkeypatch, hpatches):
    monkeypatch.setattr(settings, "DATA_PATH", str(hpatches.parent))
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    return tmp_path / "logs"


def magicleap_config(tmp_path, weights, truncate=None, **model):
    conf = {"data": {"dataset": "hpatches", "alteration": "all", "preprocessing": {"resize": [240, 320]},
                     "truncate": truncate},
            "model": {"name": "SuperPointNet_pretrained", "pretrained": str(weights), "detection_threshold": 0.015,
                      "nms": 4, "top_k": 1000, "nn_thresh": 1.0, "subpixel": {"enable": True, "patch_size": 5},
                      **model}}
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_magicleap_export_then_evaluation(exper, tmp_path, magicleap_weights):
    config = magicleap_config(tmp_path, magicleap_weights)
    export.main(["export_descriptor", str(config), "ml"])
    predictions = exper / "ml" / "predictions"
    files = sorted(predictions.glob("*.npz"), key=lambda p: int(p.stem))
    assert [p.stem for p in files] == [str(i) for i in range(10)]
    index = json.loads((predictions / "index.json").read_text())
    assert index[0]["name"] == "i_leuven_oxford/1_2" and index[9]["name"] == "v_graffiti/1_6"
    assert (exper / "ml" / "config.yml").exists()

    data = np.load(files[5])
    assert data["image"].shape == (240, 320) and data["image"].dtype == np.float32
    assert data["prob"].shape[1] == 3 and data["prob"].dtype == np.float64
    assert np.all(np.diff(data["prob"][:, 2]) <= 0)  # sorted by score
    assert data["desc"].shape == (len(data["prob"]), 256) and data["desc"].dtype == np.float32
    # Descriptors are sampled where the saved (sub-pixel) points are.
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained", "pretrained": str(magicleap_weights)})
    dense = extractor.run_network(torch.from_numpy(data["image"])[None, None])["desc"]
    resampled = sample_descriptors(dense, torch.from_numpy(data["prob"][:, :2]).float()[None])[0]
    assert np.allclose(resampled.numpy(), data["desc"], atol=1e-4)
    assert np.any(data["prob"][:, :2] != np.round(data["prob"][:, :2]))
    # Saved matches are the mutual nearest neighbours under nn_thresh 1.0.
    i1, i2, _ = mutual_nearest_neighbours(torch.from_numpy(data["desc"]), torch.from_numpy(data["warped_desc"]), 1.0)
    expected = np.concatenate([data["prob"][i1.numpy(), :2], data["warped_prob"][i2.numpy(), :2]], axis=1)
    assert np.allclose(data["matches"], expected)

    results = evaluate_predictions(predictions, repeatability=True, homography=True)
    assert results["n_pairs"] == 10 and results["n_failed"] == 0
    assert 0.4 < results["repeatability"] < 0.9
    assert 0.5 < results["localization_err"] < 1.6
    # Illumination pairs and mild viewpoint pairs are easy; graffiti 1_5 / 1_6 are not.
    assert 0.6 <= results["homography_correctness"]["3"] <= 1.0
    assert 0.3 < results["mAP"] <= 1.0 and 0.2 < results["mscore"] < 0.9
    assert json.loads((predictions / "result.json").read_text())["n_pairs"] == 10


def test_sift_export_then_evaluation(exper):
    export_classical.main(["export_descriptor", "configs/classical_descriptors.yaml", "sift"])
    predictions = exper / "sift" / "predictions"
    data = np.load(predictions / "0.npz")
    assert data["prob"].shape[1] == 2 and data["desc"].shape[1] == 128
    assert data["matches"].shape[1] == 6 and np.all(data["matches"][:, 5] < 0.8)
    results = evaluate_predictions(predictions, repeatability=True, homography=True, sift=True)
    assert results["n_pairs"] == 10 and 0.3 < results["repeatability"] < 0.95
    assert results["homography_correctness"]["5"] >= 0.5


def test_protocol_switches_and_resume(exper, tmp_path, magicleap_weights, capsys):
    config = magicleap_config(tmp_path, magicleap_weights, truncate=4)
    export.main(["export_descriptor", str(config), "paper", "--resize", "480", "640", "--nms", "8",
                 "--top-k", "50", "--detection-threshold", "0.05"])
    data = np.load(exper / "paper" / "predictions" / "0.npz")
    assert data["image"].shape == (480, 640) and len(data["prob"]) == 50
    pts = data["prob"][:, :2]
    gaps = np.abs(pts[:, None] - pts[None]).max(-1) + np.eye(len(pts)) * 100
    assert gaps.min() > 8 - 2 * 0.5 * 2  # NMS 8 before sub-pixel moves (each at most half a patch)
    assert data["prob"][:, 2].min() >= 0.05
    stamp = (exper / "paper" / "predictions" / "3.npz").stat().st_mtime_ns
    export.main(["export_descriptor", str(config), "paper", "--resize", "480", "640", "--nms", "8",
                 "--top-k", "50", "--detection-threshold", "0.05", "--resume"])
    assert (exper / "paper" / "predictions" / "3.npz").stat().st_mtime_ns == stamp
    # Resuming with other settings would mix two configurations: refused, naming what differs.
    with pytest.raises(SystemExit) as e:
        export.main(["export_descriptor", str(config), "paper", "--resize", "480", "640", "--resume"])
    assert e.value.code == 2
    assert "model.nms (8 -> 4)" in capsys.readouterr().err
    assert (exper / "paper" / "predictions" / "3.npz").stat().st_mtime_ns == stamp


def test_cli_errors_name_the_problem(exper, tmp_path, magicleap_weights, capsys, monkeypatch, hpatches):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"dataset": "hpatches"}, "model": {"detecton_threshold": 0.1}}))
    with pytest.raises(SystemExit) as e:
        export.main(["export_descriptor", str(bad), "x"])
    assert e.value.code == 2
    assert "unknown config key 'model.detecton_threshold'" in capsys.readouterr().err
    config = magicleap_config(tmp_path, magicleap_weights)
    monkeypatch.setattr(settings, "DATA_PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit):
        export.main(["export_descriptor", str(config), "x"])
    assert "HPatches folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["export_descriptor", str(config), "x", "--resize", "241", "320"])
    assert "multiples of 8" in capsys.readouterr().err
    monkeypatch.setattr(settings, "DATA_PATH", str(hpatches.parent))
    with pytest.raises(SystemExit):
        export.main(["export_descriptor", str(config), "x", "--weights", str(tmp_path / "none.pth")])
    assert "weights file not found" in capsys.readouterr().err


def test_homography_adaptation_option_at_export(exper, tmp_path, magicleap_weights):
    config = magicleap_config(tmp_path, magicleap_weights, truncate=1)
    conf = yaml.safe_load(config.read_text())
    for num in (0, 1, 6):
        conf["model"]["homography_adaptation"] = {"num": num, "chunk": 3}
        config.write_text(yaml.safe_dump(conf))
        export.main(["export_descriptor", str(config), f"ha{num}"])
    single, one, adapted = (np.load(exper / f"ha{n}" / "predictions" / "0.npz") for n in (0, 1, 6))
    assert np.array_equal(single["prob"], one["prob"])  # num 1 is a single pass
    assert not np.array_equal(single["prob"], adapted["prob"]) and len(adapted["prob"]) > 50
