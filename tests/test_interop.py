"""Drop-in use with other tools, tested from formulas and layouts (no third-party code): the SuperGlue /
LightGlue descriptor sampling, the LightGlue-style Python API (`extract`, `match`), torch.hub, the
README example run from outside the repository, hloc's features.h5 / matches.h5 layout and EXIF
handling, the homography AUC, and TensorBoard reading a training's event files."""
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import export
import settings
from models import SHIPPED_SUPERPOINT
from models.SuperPointNet_pretrained import SuperPointNet_pretrained
from models.extractor import SuperPointExtractor, match
from utils import metrics
from utils.keypoints import sample_descriptors
from utils.matching import nearest_neighbour_matches

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """MagicLeap-layout weights with random values (no data needed)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "superpoint_v1.pth"
    torch.save(SuperPointNet_pretrained().state_dict(), path)
    return path


def textured(height, width, seed=0) -> np.ndarray:
    """A uint8 image with corners: random rectangles on a smooth background."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 90, np.uint8)
    for _ in range(12):
        x, y = rng.integers(0, width - 8), rng.integers(0, height - 8)
        w, h = rng.integers(6, max(7, width // 3)), rng.integers(6, max(7, height // 3))
        image[y:y + h, x:x + w] = rng.integers(0, 256)
    return cv2.GaussianBlur(image, (3, 3), 0)


# ------------------------------------------------------------------------------ descriptor sampling

def position_map(hc, wc):
    """A (1, 3, Hc, Wc) descriptor map (u + 1, v + 1, 1) at cell (v, u): bilinear sampling is linear, so
    after normalisation the ratios to the last channel give back the (u, v) that was read."""
    v, u = torch.meshgrid(torch.arange(hc, dtype=torch.float32), torch.arange(wc, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([u + 1, v + 1, torch.ones_like(u)])[None]


def read_positions(sampled):
    return sampled[..., :2] / sampled[..., 2:] - 1


def test_superglue_sampling_reads_the_map_where_the_formula_says():
    # Wc = 4, Hc = 3 (a 32 x 24 image): u = (x - 3.5) / (8 * 4 - 4.5) * 3, v = (y - 3.5) / (8 * 3 - 4.5) * 2.
    points = torch.tensor([[[3.5, 3.5], [31.0, 23.0], [17.25, 13.25], [10.375, 8.375]]])
    expected = torch.tensor([[0.0, 0.0], [3.0, 2.0], [1.5, 1.0], [0.75, 0.5]])
    out = sample_descriptors(position_map(3, 4), points, mode="superglue")
    assert torch.allclose(read_positions(out[0]), expected, atol=1e-5)
    # exact: u = (x - 3.5) / 8: the same points read cell centres; x = 31 is clamped to the last column.
    out = sample_descriptors(position_map(3, 4), points, mode="exact")
    assert torch.allclose(read_positions(out[0]), torch.tensor([[0.0, 0.0], [3.0, 2.0], [1.71875, 1.21875],
                                                                [0.859375, 0.609375]]), atol=1e-5)
    # The two agree at the first cell centre and drift apart towards the far edge (by up to 3.5 px).
    x = torch.tensor([[[3.5 + 8 * 3, 3.5]]])
    sg = read_positions(sample_descriptors(position_map(3, 4), x, mode="superglue")[0])[0, 0]
    assert sg == pytest.approx(24 / 27.5 * 3, abs=1e-5) and 8 * (3 - sg) == pytest.approx(3.0545, abs=1e-3)
    with pytest.raises(ValueError, match="descriptor sampling is 'nearest'"):
        sample_descriptors(position_map(3, 4), points, mode="nearest")


def test_superglue_sampling_blends_with_zeros_outside_the_map():
    desc = torch.ones(1, 2, 2, 2)
    desc[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # x = 2 is before the first column centre: u = -1.5 / 11.5 -> a 0.1304 share of zero padding, which
    # scales both channels alike; normalised, it equals the border value (1, 1) of row 0.
    out = sample_descriptors(desc, torch.tensor([[[2.0, 3.5]]]), mode="superglue")
    assert torch.allclose(out[0, 0], F.normalize(torch.tensor([1.0, 1.0]), dim=0), atol=1e-6)


def test_descriptor_sampling_option_and_its_defaults(random_weights, tmp_path):
    assert SuperPointExtractor().conf["descriptor_sampling"] == "exact"
    with pytest.raises(ValueError, match="model.descriptor_sampling is 'bilinear'"):
        SuperPointExtractor({"descriptor_sampling": "bilinear"})
    magicleap = SuperPointExtractor.from_weights(random_weights, detection_threshold=0.0)
    assert magicleap.conf["descriptor_sampling"] == "superglue"  # what MagicLeap's weights were trained with
    assert SuperPointExtractor.from_weights(random_weights, descriptor_sampling="exact").conf[
        "descriptor_sampling"] == "exact"
    image = torch.from_numpy(textured(61, 83)).float()[None, None] / 255
    out = magicleap(image)
    expected = sample_descriptors(out["dense_descriptors"], out["keypoints"][0][None], mode="superglue")[0]
    assert len(expected) > 10 and torch.equal(out["descriptors"][0], expected)


# ------------------------------------------------------------------------------ matching

def brute_force(d0, d1, max_distance, ratio, mutual):
    """The matching rule written as loops over a float64 distance matrix."""
    dist = torch.cdist(d0.double(), d1.double())

    def best(row_dist):
        order = torch.argsort(row_dist)
        first = row_dist[order[0]]
        ok = max_distance is None or first <= max_distance
        if ratio is not None and len(order) > 1 and min(len(d0), len(d1)) > 1:
            ok = ok and first <= ratio * row_dist[order[1]]
        return int(order[0]) if ok else -1

    forward = [best(dist[i]) for i in range(len(d0))]
    backward = [best(dist[:, j]) for j in range(len(d1))]
    return [j if j >= 0 and (not mutual or backward[j] == i) else -1 for i, j in enumerate(forward)]


@pytest.mark.parametrize("max_distance,ratio,mutual", [(None, None, True), (0.7, None, True), (None, 0.8, True),
                                                       (1.0, 0.9, False), (1.2, 0.95, True)])
def test_nearest_neighbour_matches_follow_the_rule(max_distance, ratio, mutual):
    gen = torch.Generator().manual_seed(1)
    d1 = F.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    d0 = F.normalize(torch.cat([d1[:25] + 0.15 * torch.randn(25, 16, generator=gen),
                                torch.randn(10, 16, generator=gen)]), dim=-1)
    matches0, scores0 = nearest_neighbour_matches(d0[None], d1[None], max_distance=max_distance, ratio=ratio,
                                                  mutual=mutual)
    expected = brute_force(d0, d1, max_distance, ratio, mutual)
    assert matches0[0].tolist() == expected and 5 < sum(m >= 0 for m in expected) < 35
    cos = (d0 * d1[matches0[0].clamp_min(0)]).sum(-1)
    assert torch.allclose(scores0[0], torch.where(matches0[0] >= 0, (1 + cos) / 2, 0.0), atol=1e-6)


def test_match_on_extract_outputs_with_padding_and_hand_made_descriptors():
    def unit2(degrees):  # 2-D unit vectors at these angles
        a = torch.deg2rad(torch.tensor(degrees, dtype=torch.float32))
        return torch.stack([a.cos(), a.sin()], dim=-1)

    # image 0: 0, 90, 200 degrees and a padded slot; image 1: 5, 100, 180 degrees.
    feats0 = {"descriptors": torch.cat([unit2([0, 90, 200]), torch.zeros(1, 2)])[None],
              "mask": torch.tensor([[True, True, True, False]])}
    feats1 = {"descriptors": unit2([5, 100, 180])[None], "mask": torch.ones(1, 3, dtype=torch.bool)}
    # Distances 2 sin(delta / 2): 5 deg -> 0.087, 10 deg -> 0.174, 20 deg -> 0.347.
    out = match(feats0, feats1, max_distance=0.3)
    assert out["matches0"].tolist() == [[0, 1, -1, -1]]
    assert out["matches"][0].tolist() == [[0, 0], [1, 1]]
    assert torch.allclose(out["scores"][0], (1 + torch.cos(torch.deg2rad(torch.tensor([5.0, 10.0])))) / 2)
    assert match(feats0, feats1, max_distance=None)["matches0"].tolist() == [[0, 1, 2, -1]]
    # Ratio: 200 deg is 20 deg from 180 and 95 deg from 100 (distance 1.476): 0.347 / 1.476 = 0.235.
    assert match(feats0, feats1, max_distance=None, ratio=0.2)["matches0"].tolist() == [[0, 1, -1, -1]]
    assert match(feats0, feats1, max_distance=None, ratio=0.25)["matches0"].tolist() == [[0, 1, 2, -1]]


def test_extract_outputs_record_gradients_downstream(random_weights):
    extractor = SuperPointExtractor.from_weights(random_weights)
    feats = extractor.extract(torch.from_numpy(textured(48, 64)))
    assert not any(v.is_inference() for v in feats.values())
    layer = torch.nn.Linear(256, 8)  # a learned matcher would do the same
    loss = layer(feats["descriptors"]).square().mean()
    loss.backward()  # "Inference tensors cannot be saved for backward" under inference_mode
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ hub and README example

def test_torch_hub_load_from_a_local_checkout(random_weights):
    hub = torch.hub.load(str(REPO), "superpoint", source="local", weights=str(random_weights), top_k=50)
    direct = SuperPointExtractor.from_weights(random_weights, top_k=50)
    assert hub.conf == direct.conf and hub.conf["descriptor_sampling"] == "superglue"
    image = torch.from_numpy(textured(64, 80))
    a, b = hub.extract(image), direct.extract(image)
    assert a["mask"].sum() == 50 and all(torch.equal(a[k], b[k]) for k in a)
    random_net = torch.hub.load(str(REPO), "superpoint", source="local", weights="random")
    assert isinstance(random_net, SuperPointExtractor) and random_net.conf["pretrained"] is None
    shipped = torch.hub.load(str(REPO), "superpoint", source="local")  # no weights: the project's own
    assert shipped.conf["pretrained"] == str(SHIPPED_SUPERPOINT) and shipped.conf["descriptor_sampling"] == "exact"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if "from models.extractor import SuperPointExtractor, match" in b]
    assert found, "README has no API example"
    return found[0]


def installed_outside_repo() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('models').origin)"],
                           cwd="/", capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                         if k != "PYTHONPATH"})
    return probe.returncode == 0 and probe.stdout.strip().startswith(str(REPO))


@pytest.mark.parametrize("how", ["PYTHONPATH", "pip install -e"])
def test_readme_example_runs_outside_the_repository(tmp_path, random_weights, how):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if how == "PYTHONPATH":
        env["PYTHONPATH"] = str(REPO)
    elif not installed_outside_repo():
        pytest.skip("this checkout is not pip-installed in the test's environment (`make venv` installs it)")
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "superpoint_v1.pth").write_bytes(random_weights.read_bytes())
    base = textured(120, 160, seed=3)
    cv2.imwrite(str(tmp_path / "image0.jpg"), base)
    cv2.imwrite(str(tmp_path / "image1.jpg"), np.roll(base, (3, 5), axis=(0, 1)))
    (tmp_path / "example.py").write_text(readme_example())
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ matches", proc.stdout), proc.stdout


# ------------------------------------------------------------------------------ hloc files

@pytest.fixture
def hloc_folder(tmp_path):
    root = tmp_path / "images"
    (root / "seq").mkdir(parents=True)
    base = textured(90, 130, seed=5)
    cv2.imwrite(str(root / "seq" / "a.png"), base)
    cv2.imwrite(str(root / "seq" / "b.png"), np.roll(base, (2, 4), axis=(0, 1)))
    cv2.imwrite(str(root / "c.png"), textured(70, 100, seed=6))
    return root


def write_config(tmp_path, root, weights, **matching):
    conf = {"data": {"root": str(root), "preprocessing": {"max_edge": None}},
            "model": {"name": "SuperPointNet_pretrained", "pretrained": str(weights), "top_k": 200,
                      "descriptor_sampling": "superglue"},
            "matching": {"max_distance": 1.2, **matching}}
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def test_matches_h5_in_hlocs_layout(hloc_folder, random_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    pairs = tmp_path / "pairs.txt"
    # a pair and its reverse are matched once; an unknown image is reported and counted
    pairs.write_text("seq/a.png seq/b.png\nseq/b.png seq/a.png\nseq/a.png c.png\nseq/a.png missing.png\n")
    export.main(["export_features", write_config(tmp_path, hloc_folder, random_weights), "m", "--pairs", str(pairs)])
    out = tmp_path / "logs" / "m"
    with h5py.File(out / "features.h5", "r") as feats, h5py.File(out / "matches.h5", "r") as h5:
        # hloc's pair name: the two names joined by '/', each name's own '/' replaced by '-'
        groups = []
        h5.visititems(lambda name, obj: groups.append(name) if isinstance(obj, h5py.Group) and "matches0" in obj
                      else None)
        assert sorted(groups) == ["seq-a.png/c.png", "seq-a.png/seq-b.png"]
        pair = h5["seq-a.png/seq-b.png"]
        matches0, scores0 = pair["matches0"][()], pair["matching_scores0"][()]
        assert matches0.dtype == np.int16 and scores0.dtype == np.float16
        assert matches0.shape == (len(feats["seq/a.png/keypoints"]),)
        assert matches0.max() < len(feats["seq/b.png/keypoints"]) and (matches0 == -1).any()
        d0, d1 = (torch.from_numpy(feats[f"seq/{n}.png/descriptors"][()].T)[None] for n in "ab")
        expected = match({"descriptors": d0}, {"descriptors": d1}, max_distance=1.2)
        assert np.array_equal(matches0, expected["matches0"][0].numpy())
        assert np.allclose(scores0, expected["matching_scores0"][0].numpy(), atol=1e-3)
        assert np.all(scores0[matches0 == -1] == 0) and np.all(scores0[matches0 >= 0] > 0.5)
        assert feats["seq/a.png/keypoints"].attrs["uncertainty"] == 2.0  # full size: factor 1
    summary = yaml.safe_load((out / "features.json").read_text())
    assert summary["matches"]["n_written"] == 2 and summary["matches"]["n_failed"] == 1
    assert "missing.png" in summary["matches"]["failed"][0]["error"]


def test_exif_orientation_is_ignored_as_hloc_does_unless_asked(tmp_path, random_weights, monkeypatch):
    image_module = pytest.importorskip("PIL.Image")
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    root = tmp_path / "exif"
    root.mkdir()
    exif = image_module.Exif()
    exif[0x0112] = 6  # orientation: the viewer rotates the stored 96 x 64 (W x H) pixels by 90 degrees
    image_module.fromarray(textured(64, 96)).save(root / "rotated.jpg", exif=exif, quality=95)
    config = write_config(tmp_path, root, random_weights)
    export.main(["export_features", config, "stored"])
    conf = yaml.safe_load(Path(config).read_text())
    conf["data"]["preprocessing"]["exif_orientation"] = True
    Path(config).write_text(yaml.safe_dump(conf))
    export.main(["export_features", config, "oriented"])
    sizes = {}
    for name in ("stored", "oriented"):
        with h5py.File(tmp_path / "logs" / name / "features.h5", "r") as h5:
            sizes[name] = h5["rotated.jpg/image_size"][()].tolist()
            assert h5["rotated.jpg/keypoints"][()][:, 0].max() < sizes[name][0]
    assert sizes == {"stored": [96, 64], "oriented": [64, 96]}


# ------------------------------------------------------------------------------ homography AUC

def test_homography_auc_on_hand_made_error_lists():
    # Recall curve through (0, 0), (0.5, 1/3), (2, 2/3); the failure (inf) is never recalled.
    auc = metrics.homography_auc([2.0, float("inf"), 0.5])
    # @1: 0.5 * (1/3) / 2 + 0.5 * (1/3); @3: 1/12 + 1.5 * (1/3 + 2/3) / 2 + 1 * 2/3, over 3; @5: ... + 3 * 2/3, over 5
    assert auc == pytest.approx({"1": 0.25, "3": 0.5, "5": 34 / 60})
    # One error e below t: area e / 2 + (t - e), so AUC = 1 - e / (2 t).
    assert metrics.homography_auc([0.4], (1, 2)) == pytest.approx({"1": 0.8, "2": 0.9})
    assert metrics.homography_auc([0.0, 0.0]) == pytest.approx({"1": 1.0, "3": 1.0, "5": 1.0})
    assert metrics.homography_auc([float("nan"), 7.0]) == {"1": 0.0, "3": 0.0, "5": 0.0}
    assert metrics.homography_auc([]) is None


# ------------------------------------------------------------------------------ TensorBoard

def test_tensorboard_reads_a_short_trainings_events(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import datasets
    import test_trainer

    monkeypatch.setitem(datasets.DATASETS, "TinySquares", ("test_trainer", "TinySquares"))
    conf = test_trainer.make_conf(data={"pair": True}, train_iter=4, save_interval=4, validation_interval=2,
                                  tensorboard_interval=2)
    test_trainer.run(tmp_path, conf, validate=True)
    event_files = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert event_files
    acc = event_accumulator.EventAccumulator(str(event_files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    readme = (REPO / "README.md").read_text()
    listed = set(re.findall(r"`((?:train|val)-[\w_]+)`", readme))
    assert {"train-loss", "train-precision", "train-recall", "val-precision", "val-recall", "val-loss",
            "train-labels_vs_predictions", "train-heatmap", "val-heatmap"} <= listed
    # A detector run: the descriptor-loss scalars of joint training come from the same loop over losses.
    for tag in listed - {"train-loss_desc", "train-positive_dist", "train-negative_dist"}:
        assert tag in tags["scalars"] or tag in tags["images"], (tag, tags)
    steps = [e.step for e in acc.Scalars("train-loss")]
    assert steps == [1, 2, 3, 4] and all(np.isfinite(e.value) for e in acc.Scalars("train-loss"))
    assert [e.step for e in acc.Scalars("val-precision")] == [2, 4]
    image = acc.Images("train-labels_vs_predictions")[0]
    decoded = cv2.imdecode(np.frombuffer(image.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[:2] == (image.height, image.width)
