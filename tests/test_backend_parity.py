"""Backends and reduced precision against PyTorch fp32 (utils/backends.py): MagicLeap's weights on the
shared HPatches pairs for torch bf16 and every other backend and precision (keypoints within 1 px, the
evaluation's metrics), homography adaptation (the label export's heatmaps), a short bf16 training run,
the backend switch itself.

These run on any CPU. Where the CPU has no bf16 units, PyTorch emulates bf16 (slower; the inputs stay
small) and OpenVINO runs fp32 instead, which `concrete_precision` says.
"""
import numpy as np
import pytest
import torch
import yaml

import datasets
import export
import settings
from models.extractor import SuperPointExtractor, keypoints_from_heatmap
from pipeline import trainer as trainer_lib
from tests.conftest import MAGICLEAP_WEIGHTS, SHARED_DATA
from tests.test_trainer import make_conf
from utils import backends
from utils import homography_adaptation as ha
from utils.evaluation import evaluate_predictions, prediction_files
from utils.keypoints import logits_to_heatmap

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = [("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
# Largest allowed |metric - torch fp32 metric|. Homography correctness over 10 pairs moves in steps of
# 0.1: one pair may change its verdict.
METRIC_TOLERANCE = {"repeatability": 0.01, "localization_err": 0.05, "mAP": 0.02, "mscore": 0.02}
HOMOGRAPHY_TOLERANCE = 0.1


def share_within(reference: np.ndarray, other: np.ndarray, radius: float = 1.0) -> tuple[int, int]:
    """(points of `reference` with a point of `other` within `radius` px, points of `reference`)."""
    if len(reference) == 0:
        return 0, 0
    if len(other) == 0:
        return 0, len(reference)
    distances = np.linalg.norm(reference[:, None, :2] - other[None, :, :2], axis=-1)
    return int((distances.min(axis=1) <= radius).sum()), len(reference)


@pytest.fixture(scope="module")
def hpatches_exports(tmp_path_factory):
    """HPatches predictions (10 pairs, 240x320, top-k 1000, sub-pixel) of torch fp32 and each variant:
    {(backend, precision): predictions folder}."""
    if not (MAGICLEAP_WEIGHTS.exists() and (SHARED_DATA / "HPatches").is_dir()):
        pytest.skip(f"needs {MAGICLEAP_WEIGHTS} and {SHARED_DATA / 'HPatches'} (shared real data); not present")
    root = tmp_path_factory.mktemp("backends")
    config = root / "export.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "hpatches", "alteration": "all", "preprocessing": {"resize": [240, 320]}},
        "model": {"name": "SuperPointNet_pretrained", "pretrained": str(MAGICLEAP_WEIGHTS), "nms": 4, "top_k": 1000,
                  "detection_threshold": 0.015, "nn_thresh": 1.0, "subpixel": {"enable": True}, "threads": 1}}))
    folders = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "DATA_PATH", str(SHARED_DATA))
        mp.setattr(settings, "EXPER_PATH", str(root / "logs"))
        for backend, precision in [("torch", "fp32")] + VARIANTS:
            name = f"{backend}_{precision}"
            export.main(["export_descriptor", str(config), name, "--backend", backend, "--precision", precision])
            folders[backend, precision] = root / "logs" / name / "predictions"
    return folders


@pytest.mark.parametrize("backend,precision", VARIANTS)
def test_hpatches_keypoints_and_metrics_match_fp32(hpatches_exports, backend, precision):
    reference, variant = hpatches_exports["torch", "fp32"], hpatches_exports[backend, precision]
    close = total = 0
    for path in prediction_files(reference):
        a, b = np.load(path), np.load(variant / path.name)
        for key in ("prob", "warped_prob"):
            c, t = share_within(a[key], b[key])
            close, total = close + c, total + t
    assert total > 3000 and close / total >= 0.95, (close, total)
    want = evaluate_predictions(reference, repeatability=True, homography=True)
    got = evaluate_predictions(variant, repeatability=True, homography=True)
    for key, tolerance in METRIC_TOLERANCE.items():
        assert abs(got[key] - want[key]) <= tolerance, (key, got[key], want[key])
    for eps, value in want["homography_correctness"].items():
        assert abs(got["homography_correctness"][eps] - value) <= HOMOGRAPHY_TOLERANCE + 1e-9, eps


@pytest.mark.parametrize("backend,precision", VARIANTS)
def test_homography_adaptation_labels_match_fp32(magicleap_weights, hpatches, backend, precision):
    # The label export's computation (utils.homography_adaptation + keypoints), same homographies.
    import cv2

    image = cv2.resize(cv2.imread(str(hpatches / "i_leuven_oxford" / "1.ppm"), 0), (320, 240),
                       interpolation=cv2.INTER_AREA)
    images = torch.from_numpy(image.astype(np.float32) / 255)[None, None]
    conf = ha.merged_conf({"enable": True, "num": 10, "chunk": 5})
    points = []
    for b, p in [("torch", "fp32"), (backend, precision)]:
        ex = SuperPointExtractor.from_weights(magicleap_weights, backend=b, precision=p, subpixel={"enable": True})
        heatmap = ha.adapt_heatmap(images, ex.heatmap, conf, np.random.default_rng(0))
        points.append(keypoints_from_heatmap(heatmap, ex.conf)[0][0].numpy())
    close, total = share_within(points[0], points[1])
    assert total > 150 and close / total >= 0.95, (close, total)


def test_bf16_training_lowers_the_loss_like_fp32(tmp_path, monkeypatch):
    from tests.test_trainer import TinySquares

    monkeypatch.setitem(datasets.DATASETS, "TinySquares", (TinySquares.__module__, "TinySquares"))
    ratios = {}
    for precision in ("fp32", "bf16"):
        conf = make_conf(data={"length": 4}, training={"precision": precision, "threads": 1})
        tr = trainer_lib.Trainer(conf, tmp_path / precision)
        batches = tr.data.batches(tr.n_iter)
        losses = [float(tr.train_step(next(batches))[0]["loss"]) for _ in range(12)]
        batches.close()
        assert tr.concrete_precision == precision
        ratios[precision] = np.mean(losses[-3:]) / np.mean(losses[:3])
    assert ratios["bf16"] < 0.8 and abs(ratios["bf16"] - ratios["fp32"]) <= 0.1, ratios


def test_backend_switch_and_errors(magicleap_weights, monkeypatch):
    assert backends.auto_backend("cpu", "fp32") == "onnxruntime"
    assert backends.auto_backend("cuda", "auto") == "torch"
    bf16 = backends.auto_backend("cpu", "auto")
    assert bf16 == ("openvino" if backends.precision_lib.cpu_has_fast_bf16() else "onnxruntime")
    ex = SuperPointExtractor.from_weights(magicleap_weights, backend="auto", precision="fp32")
    assert isinstance(ex.backend, backends.OnnxRuntimeBackend) and ex.backend.concrete_precision == "fp32"
    with pytest.raises(ValueError, match="model.backend is 'tensorrt'"):
        SuperPointExtractor.from_weights(magicleap_weights, backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        backends.OpenVinoBackend(torch.nn.Conv2d(1, 1, 1), "cuda")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)  # nothing installed
    assert backends.auto_backend("cpu", "fp32") == "torch"
    with pytest.raises(ValueError, match="pip install openvino"):
        SuperPointExtractor.from_weights(magicleap_weights, backend="openvino")


def test_openvino_compiles_each_shape_once_and_copies_outputs(magicleap_weights):
    ex = SuperPointExtractor.from_weights(magicleap_weights, backend="openvino", precision="fp32")
    reference = SuperPointExtractor.from_weights(magicleap_weights, channels_last=False)
    a, b = torch.rand(1, 1, 48, 64), torch.rand(2, 1, 32, 40)
    first = ex.run_network(a)
    ex.run_network(b)
    again = ex.run_network(a)
    both = ("semi", "descriptors")
    assert list(ex.backend._compiled) == [((2, 1, 32, 40), both), ((1, 1, 48, 64), both)]
    assert torch.equal(first["semi"], again["semi"])  # not overwritten by the later calls
    want = reference.run_network(b)
    got = ex.run_network(b)
    assert got["semi"].shape == (2, 65, 4, 5) and (got["semi"] - want["semi"]).abs().max() < 1e-3
    # The detector head alone (the label export's heatmaps) is its own compilation, with the same logits.
    detector = ex.run_network(b, heads=("semi",))
    assert list(detector) == ["semi"] and list(ex.backend._compiled)[-1] == ((2, 1, 32, 40), ("semi",))
    assert (detector["semi"] - got["semi"]).abs().max() < 1e-5
    assert torch.allclose(ex.heatmap(b), logits_to_heatmap(got["semi"]), atol=1e-6)
