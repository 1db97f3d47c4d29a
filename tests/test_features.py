"""Using the features elsewhere: the LightGlue-style `SuperPointExtractor.extract`, `from_weights`,
the hloc-layout `export.py export_features` and the `match_pair.py` demo."""
import json
import re
import shutil

import cv2
import h5py
import numpy as np
import pytest
import torch
import yaml

import export
import match_pair
import settings
from models import extractor as extractor_lib
from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained
from models.extractor import SuperPointExtractor, network_for_weights, to_grey
from pipeline import export_features
from utils.checkpoints import save_checkpoint
from utils.config import ConfigError
from utils.images import check_preprocessing, network_size, read_image
from utils.io import DataError

FREIBURG = "natural/freiburg_sequence"
FRAMES = ("1341847980.722988.png", "1341847981.726650.png")
SCANNET = "natural/scannet_sample_images/scene0711_00_frame-001680.jpg"  # 1296 x 968


@pytest.fixture
def extractor(magicleap_weights):
    return SuperPointExtractor.from_weights(magicleap_weights)


def grey(path, size=None) -> np.ndarray:
    """(H, W) float32 in [0, 1], optionally resized to size (H, W) with INTER_AREA."""
    image = read_image(path)
    if size is not None:
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return image.astype(np.float32) / 255


def test_extract_returns_padded_lightglue_dict(extractor, shared_data):
    images = [grey(shared_data / FREIBURG / f, (120, 160)) for f in FRAMES] + [np.full((120, 160), 0.5, np.float32)]
    batch = torch.from_numpy(np.stack(images))[:, None]
    out = extractor.extract(batch)
    per_image = extractor(batch)["keypoints"]
    counts = [len(k) for k in per_image]
    assert counts[0] != counts[1] and counts[2] == 0 and min(counts[:2]) > 20  # padding is exercised
    n = max(counts)
    assert out["keypoints"].shape == (3, n, 2) and out["keypoints"].dtype == torch.float32
    assert out["keypoint_scores"].shape == (3, n) and out["descriptors"].shape == (3, n, 256)
    assert out["mask"].dtype == torch.bool and out["mask"].sum(1).tolist() == counts
    assert out["image_size"].tolist() == [[160, 120]] * 3
    for i, count in enumerate(counts):
        assert torch.equal(out["keypoints"][i, :count], per_image[i])
        assert torch.all(out["keypoint_scores"][i, :count][:-1] >= out["keypoint_scores"][i, :count][1:])
        assert torch.allclose(out["descriptors"][i, :count].norm(dim=-1), torch.ones(count), atol=1e-5)
        assert not out["keypoints"][i, count:].any() and not out["descriptors"][i, count:].any()
        assert not out["keypoint_scores"][i, count:].any() and not out["mask"][i, count:].any()


def test_extract_accepts_rgb_and_any_size(extractor, shared_data):
    bgr = cv2.imread(str(shared_data / FREIBURG / FRAMES[0]))[:61, :83]
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    expected_grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    assert np.abs(to_grey(rgb)[0, 0].numpy() - expected_grey).max() <= 0.5 / 255 + 1e-6  # OpenCV rounds to uint8
    assert torch.allclose(to_grey(torch.eye(3)[None, :, :, None]).flatten(), torch.tensor([0.299, 0.587, 0.114]))

    out = extractor.extract(rgb)
    assert out["image_size"].tolist() == [[83, 61]] and out["mask"].sum() > 0
    # 61 x 83 holds 7 x 10 whole cells: points only in the top-left 56 x 80 pixels, inside the border.
    assert out["keypoints"].min() >= 4 and out["keypoints"][..., 0].max() <= 75 and out["keypoints"][..., 1].max() <= 51
    # Unlike a crop, the network sees the partial cells too (as LightGlue and hloc): they change the map.
    grey = to_grey(rgb)
    changed = grey.clone()
    changed[..., 56:, :] = 1 - changed[..., 56:, :]
    assert not torch.allclose(extractor(grey)["dense_descriptors"], extractor(changed)["dense_descriptors"])
    # (C, H, W) and (H, W) as LightGlue takes them; uint8 is divided by 255.
    assert torch.equal(extractor.extract(rgb[0])["keypoints"], out["keypoints"])
    grey_u8 = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    from_u8, from_float = extractor.extract(grey_u8), extractor.extract(grey_u8.float() / 255)
    assert all(torch.equal(from_u8[k], from_float[k]) for k in from_u8)
    for bad, message in ((rgb[..., :7, :], "7x83 are too small: the network needs at least 8x8"), (rgb[:, :2], r"C = 1 \(grey\) or 3"),
                         (grey_u8.int(), "dtype torch.int32"), (bgr, "expected a torch.Tensor"),
                         (rgb[None], r"\(H, W\), \(C, H, W\) or \(B, C, H, W\)")):
        with pytest.raises(ValueError, match=message):
            extractor.extract(bad)


def test_from_weights_picks_the_network_of_the_file(magicleap_weights, tmp_path):
    magicleap = SuperPointExtractor.from_weights(magicleap_weights, nms=8)
    assert isinstance(magicleap.net, SuperPointNet_pretrained) and magicleap.conf["nms"] == 8
    assert torch.equal(magicleap.net.conv1a.weight, torch.load(magicleap_weights, weights_only=True)["conv1a.weight"])

    torch.manual_seed(0)
    trained = SuperPointNet_gauss2()
    trained.bnPa.running_mean.uniform_(-1, 1)  # not the default, so loading is visible
    path = save_checkpoint(tmp_path, 500, trained, loss=torch.tensor(1.0))
    assert network_for_weights(path) == "SuperPointNet_gauss2"
    reference = SuperPointExtractor.from_weights(path)
    assert isinstance(reference.net, SuperPointNet_gauss2)
    assert torch.equal(reference.net.bnPa.running_mean, trained.bnPa.running_mean)

    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="other.pth: weights of neither SuperPoint layout"):
        SuperPointExtractor.from_weights(tmp_path / "other.pth")


def test_network_size_and_preprocessing_checks():
    assert network_size(480, 640, {"resize": [240, 320]}) == (240, 320)
    # hloc's resize_max: both sides scaled by max_edge / longer side, rounded to the nearest integer.
    assert network_size(480, 640, {"max_edge": 500}) == (375, 500)
    assert network_size(600, 900, {"max_edge": 640}) == (427, 640)  # 426.67
    assert network_size(480, 640, {"max_edge": 1024}) == (480, 640)  # never enlarged ...
    assert network_size(480, 640, {"max_edge": 1024, "resize_force": True}) == (768, 1024)  # ... unless forced
    assert network_size(61, 83, {}) == (61, 83)  # full size
    assert check_preprocessing({"max_edge": 64}) == {"resize": None, "max_edge": 64, "resize_force": False,
                                                     "exif_orientation": False}
    with pytest.raises(ConfigError, match="exif_orientation"):
        check_preprocessing({"exif_orientation": "yes"})
    with pytest.raises(ConfigError, match="not both"):
        check_preprocessing({"resize": [240, 320], "max_edge": 320})
    with pytest.raises(ConfigError, match="multiples of 8"):
        check_preprocessing({"resize": [241, 320]})
    with pytest.raises(ConfigError, match="max_edge"):
        check_preprocessing({"max_edge": 4})


@pytest.fixture
def image_folder(tmp_path, shared_data):
    root = tmp_path / "images"
    (root / "office").mkdir(parents=True)
    for name, frame in zip(("a.png", "b.png"), FRAMES):
        shutil.copy(shared_data / FREIBURG / frame, root / "office" / name)
    shutil.copy(shared_data / SCANNET, root / "scan.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    return root


@pytest.fixture
def features_config(tmp_path, magicleap_weights, monkeypatch):
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))

    def write(root, **preprocessing):
        conf = {"data": {"root": str(root), "preprocessing": preprocessing},
                # The fp32 torch path, so the tests can compare with the `extractor` fixture exactly.
                "model": {"name": "SuperPointNet_pretrained", "pretrained": str(magicleap_weights), "top_k": 500,
                          "backend": "torch", "precision": "fp32"}}
        path = tmp_path / "features.yaml"
        path.write_text(yaml.safe_dump(conf))
        return str(path)
    return write


def test_hloc_export_layout_and_original_coordinates(image_folder, features_config, extractor, tmp_path):
    export.main(["export_features", features_config(image_folder, resize=[120, 160]), "feat"])
    out = tmp_path / "logs" / "feat"
    assert not (out / "features.h5.partial").exists()
    summary = json.loads((out / "features.json").read_text())
    assert (summary["n_images"], summary["n_written"], summary["n_failed"]) == (4, 3, 1)
    assert summary["failed"][0]["image"] == "broken.jpg"
    with h5py.File(out / "features.h5", "r") as h5:
        names = []
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Group) and "keypoints" in obj
                      else None)
        assert sorted(names) == ["office/a.png", "office/b.png", "scan.jpg"]
        for name in names:
            group = h5[name]
            assert set(group) == {"keypoints", "scores", "descriptors", "image_size"}
            assert group["keypoints"].attrs["uncertainty"].dtype == np.float32
            n = len(group["scores"])
            assert 20 < n <= 500 and group["keypoints"].shape == (n, 2) and group["descriptors"].shape == (256, n)
            assert all(group[k].dtype == np.float32 for k in ("keypoints", "scores", "descriptors"))
            assert np.allclose(np.linalg.norm(group["descriptors"][()], axis=0), 1, atol=1e-5)
        assert h5["office/a.png/image_size"][()].tolist() == [640, 480]
        assert h5["scan.jpg/image_size"][()].tolist() == [1296, 968]
        # 640 x 480 -> 160 x 120 is a factor 1/4: a pixel centre x of the small image is 4 (x + 0.5) - 0.5.
        # Resized as hloc: the file's decoded grey as float, INTER_AREA, no rounding to 8 bits.
        decoded = cv2.imread(str(image_folder / "office" / "a.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        small = cv2.resize(decoded, (160, 120), interpolation=cv2.INTER_AREA) / 255
        small = extractor.extract(torch.from_numpy(small))
        expected = (small["keypoints"][0, small["mask"][0]][:500].numpy() + 0.5) * 4 - 0.5
        assert np.array_equal(h5["office/a.png/keypoints"][()], expected)
        # hloc's uncertainty: 2 px of the network input in original pixels, 2 x the mean factor.
        assert h5["office/a.png/keypoints"].attrs["uncertainty"] == 8.0
        assert h5["scan.jpg/keypoints"].attrs["uncertainty"] == pytest.approx(2 * (1296 / 160 + 968 / 120) / 2)
        scan = h5["scan.jpg/keypoints"][()]
        assert scan.min() >= -0.5 and scan[:, 0].max() <= 1296 - 0.5 and scan[:, 1].max() <= 968 - 0.5
        assert scan[:, 0].max() > 1296 * 0.6 and scan[:, 1].max() > 968 * 0.6  # spread over the original size


def test_full_size_export_keeps_pixels(tmp_path, shared_data, features_config, extractor):
    root = tmp_path / "odd"
    root.mkdir()
    cv2.imwrite(str(root / "crop.png"), cv2.imread(str(shared_data / FREIBURG / FRAMES[0]))[:101, :131])
    export.main(["export_features", features_config(root), "full"])
    with h5py.File(tmp_path / "logs" / "full" / "features.h5", "r") as h5:
        keypoints = h5["crop.png/keypoints"][()]
        assert h5["crop.png/image_size"][()].tolist() == [131, 101]
    direct = extractor.extract(torch.from_numpy(cv2.imread(str(root / "crop.png"), cv2.IMREAD_GRAYSCALE)))
    assert np.array_equal(keypoints, direct["keypoints"][0, direct["mask"][0]][:500].numpy())
    assert keypoints[:, 0].max() < 128 and keypoints[:, 1].max() < 96  # in whole cells only


def group_arrays(path, name):
    with h5py.File(path, "r") as h5:
        return {k: v[()] for k, v in h5[name].items()}


def test_hloc_export_resumes_and_survives_a_crash(image_folder, features_config, tmp_path, monkeypatch):
    config = features_config(image_folder, max_edge=160)
    export.main(["export_features", config, "feat"])
    h5_path = tmp_path / "logs" / "feat" / "features.h5"
    before = group_arrays(h5_path, "office/b.png")
    export.main(["export_features", config, "feat"])
    summary = json.loads((h5_path.parent / "features.json").read_text())
    assert (summary["n_written"], summary["n_kept_existing"], summary["n_failed"]) == (0, 3, 1)

    with h5py.File(h5_path, "a") as h5:
        del h5["office/a.png"], h5["scan.jpg"]
    real_extract = export_features.extract_file

    def crash_on_scan(extractor, path, preprocessing):  # images go in sorted order: a.png, then scan.jpg
        if path.name == "scan.jpg":
            raise RuntimeError("simulated crash")
        return real_extract(extractor, path, preprocessing)

    monkeypatch.setattr(export_features, "extract_file", crash_on_scan)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.main(["export_features", config, "feat"])
    with h5py.File(h5_path, "r") as h5:  # the finished file is untouched by the crashed run
        assert "office/b.png" in h5 and "office/a.png" not in h5 and "scan.jpg" not in h5
    with h5py.File(h5_path.with_name("features.h5.partial"), "r") as h5:
        assert "office/a.png/keypoints" in h5

    monkeypatch.setattr(export_features, "extract_file", real_extract)
    export.main(["export_features", config, "feat"])  # resumes from the partial file
    summary = json.loads((h5_path.parent / "features.json").read_text())
    assert (summary["n_written"], summary["n_kept_existing"]) == (1, 2)  # scan.jpg; a.png came from the crash
    after = group_arrays(h5_path, "office/b.png")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with h5py.File(h5_path, "r") as h5:
        assert all(f"{name}/descriptors" in h5 for name in ("office/a.png", "office/b.png", "scan.jpg"))

    h5_path.with_name("features.h5.partial").write_bytes(b"garbage")  # an unreadable partial is discarded
    export.main(["export_features", config, "feat"])
    summary = json.loads((h5_path.parent / "features.json").read_text())
    assert (summary["n_written"], summary["n_kept_existing"]) == (0, 3)
    export.main(["export_features", config, "feat", "--overwrite"])
    summary = json.loads((h5_path.parent / "features.json").read_text())
    assert (summary["n_written"], summary["n_kept_existing"]) == (3, 0)


def test_export_features_errors_name_the_problem(tmp_path, features_config, capsys):
    config = features_config(tmp_path / "missing")
    with pytest.raises(SystemExit) as e:
        export.main(["export_features", config, "x"])
    assert e.value.code == 2 and "data.root folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        export.main(["export_features", features_config(tmp_path / "empty"), "x"])
    assert "no images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["export_features", features_config(tmp_path / "empty", resize=[120, 160], max_edge=99), "x"])
    assert "not both" in capsys.readouterr().err


def test_match_pair_draws_and_counts(tmp_path, shared_data, magicleap_weights, capsys):
    first, second = (str(shared_data / FREIBURG / f) for f in FRAMES)
    output = tmp_path / "out" / "matches.png"
    result = match_pair.main([first, second, "--weights", str(magicleap_weights), "--output", str(output),
                              "--max-edge", "160"])
    printed = capsys.readouterr().out
    n_matches, n_inliers = map(int, re.search(r"matches: (\d+), inliers: (\d+)", printed).groups())
    assert (n_matches, n_inliers) == (result["n_matches"], result["n_inliers"])
    assert 10 < n_inliers <= n_matches
    figure = cv2.imread(str(output))
    assert figure.shape == (22 + 480, 640 + 4 + 640, 3)  # title strip over the two originals, 4 px apart
    assert np.any(np.all(figure == (0, 255, 0), axis=-1))  # inlier lines are drawn in green


def test_match_pair_errors(tmp_path, shared_data, monkeypatch, capsys):
    image = str(shared_data / FREIBURG / FRAMES[0])
    with pytest.raises(SystemExit) as e:
        match_pair.main([image, str(tmp_path / "nope.png")])
    assert e.value.code == 2 and "nope.png: image file not found" in capsys.readouterr().err
    monkeypatch.setattr(extractor_lib, "SHIPPED_SUPERPOINT", tmp_path / "pretrained" / "superpoint_mix.pth")
    with pytest.raises(SystemExit) as e:
        match_pair.main([image, image])
    assert e.value.code == 2 and "superpoint_mix.pth: the project's shipped weights are missing from this checkout" in capsys.readouterr().err
