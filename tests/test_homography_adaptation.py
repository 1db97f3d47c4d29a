"""Homography adaptation: the aggregation (hand cases, known geometry, single-pass equality), the
datasets it runs on (COCO, KITTI layout, image folders) and the export (resume, corrupt images,
sharding, real weights)."""
import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import settings
from datasets.Coco import Coco
from datasets.Kitti_inh import Kitti_inh
from datasets.image_folder import ImageFolder
from models.extractor import SuperPointExtractor
from pipeline import homography_adaptation_export as export
from utils import homography_adaptation as ha
from utils.config import ConfigError, load_yaml
from utils.io import DataError, load_npz
from utils.keypoints import extract_keypoints

REPO = Path(__file__).resolve().parents[1]


def translation(dx: float, dy: float = 0.0) -> torch.Tensor:
    return torch.tensor([[1.0, 0, dx], [0, 1, dy], [0, 0, 1]], dtype=torch.float64)


def about_centre(h: int, w: int, angle_deg: float = 0.0, scale: float = 1.0, perspective=(0.0, 0.0)) -> torch.Tensor:
    """Pixel homography rotating/scaling about the image centre, with a small projective part."""
    a = math.radians(angle_deg)
    c = torch.tensor([[1.0, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    m = torch.tensor([[scale * math.cos(a), -scale * math.sin(a), 0],
                      [scale * math.sin(a), scale * math.cos(a), 0],
                      [perspective[0], perspective[1], 1]], dtype=torch.float64)
    return c @ m @ torch.linalg.inv(c)


def column_ramp_fn(h: int, w: int):
    """A fake network whose heatmap ignores the image: 0.1 * column index in the frame it sees."""
    ramp = 0.1 * torch.arange(w, dtype=torch.float32).expand(h, w)
    return lambda images: ramp.expand(images.shape[0], h, w).clone()


def harris(images: torch.Tensor) -> torch.Tensor:
    """A fake detector computed from the image: Harris corner response (N, 1, H, W) -> (N, H, W),
    scaled so that the corner of a unit-contrast square scores about 1."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
    padded = F.pad(images, [1, 1, 1, 1], mode="replicate")
    gx = F.conv2d(padded, kx[None, None])
    gy = F.conv2d(padded, kx.T.contiguous()[None, None])

    def window(t):
        return F.avg_pool2d(t, 5, stride=1, padding=2, count_include_pad=False)

    ixx, iyy, ixy = window(gx * gx), window(gy * gy), window(gx * gy)
    response = ixx * iyy - ixy * ixy - 0.04 * (ixx + iyy) ** 2
    return (response.clamp_min(0) * 400)[:, 0]


def square_image(h=96, w=128, x0=40, y0=30, x1=80, y1=70) -> torch.Tensor:
    """(1, 1, H, W): a white square on black covering columns x0..x1-1 and rows y0..y1-1."""
    image = torch.zeros(1, 1, h, w)
    image[..., y0:y1, x0:x1] = 1.0
    return image


# ---------------------------------------------------------------------------------------------- core

def test_single_view_is_exactly_one_pass():
    torch.manual_seed(0)
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained"})
    images = torch.rand(2, 1, 48, 64)
    single = extractor.heatmap(images)
    for conf in ({"num": 1}, {"num": 0}, {"num": 50, "enable": False}):
        assert torch.equal(ha.adapt_heatmap(images, extractor.heatmap, conf, rng=3), single), conf


def test_identity_views_pass_through_unchanged():
    # Views that are exact identities are never resampled, so two of them average to the single pass.
    images = torch.rand(1, 1, 24, 32)
    fn = lambda x: x[:, 0] ** 2  # noqa: E731
    homs = torch.eye(3, dtype=torch.float64).expand(1, 2, 3, 3)
    out = ha.aggregate_over_homographies(images, homs, fn, {"aggregation": "mean"})
    assert torch.equal(out, fn(images))


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
def test_hand_case_translation_by_two_pixels(aggregation):
    # Views: identity and a shift of +2 px in x; the fake heatmap is F(x) = 0.1 x in each view's frame.
    # Back in the image, the shifted view gives F(x + 2) where x + 2 is inside the warped image (x <= W-3).
    h, w = 6, 10
    homs = torch.stack([torch.eye(3, dtype=torch.float64), translation(2.0)])[None]
    out = ha.aggregate_over_homographies(torch.zeros(1, 1, h, w), homs, column_ramp_fn(h, w),
                                         {"aggregation": aggregation, "valid_border_margin": 0})
    x = torch.arange(w, dtype=torch.float32)
    seen_twice = x <= w - 3
    if aggregation == "max":
        expected = torch.where(seen_twice, 0.1 * (x + 2), 0.1 * x)
    else:  # mean, and sum (the reference's name for the same masked mean)
        expected = torch.where(seen_twice, 0.1 * x + 0.1, 0.1 * x)
    assert torch.allclose(out[0], expected.expand(h, w), atol=1e-5)


def test_filter_counts_and_erosion_hand_case():
    # Shift +2 px: in the warped view columns 0, 1 see nothing; erosion by 1 px also drops column 2,
    # so back in the image the shifted view covers x in [1, W-3]. filter_counts 2 keeps only those.
    h, w = 6, 10
    homs = torch.stack([torch.eye(3, dtype=torch.float64), translation(2.0)])[None]
    out = ha.aggregate_over_homographies(torch.zeros(1, 1, h, w), homs, column_ramp_fn(h, w),
                                         {"aggregation": "mean", "valid_border_margin": 1, "filter_counts": 2})
    x = torch.arange(w, dtype=torch.float32)
    expected = torch.where((x >= 1) & (x <= w - 3), 0.1 * x + 0.1, torch.zeros(w))
    assert torch.allclose(out[0], expected.expand(h, w), atol=1e-5)


def test_masked_mean_of_a_constant_heatmap_is_constant():
    # Pixels a view does not see must not pull the mean down, however the views cut the image.
    h, w = 48, 64
    homs = torch.stack([torch.eye(3, dtype=torch.float64), about_centre(h, w, 30, 1.3),
                        about_centre(h, w, -50, 0.7, (1e-3, -5e-4)), translation(-20, 9)])[None]
    ones = lambda x: torch.ones(x.shape[0], h, w)  # noqa: E731
    for margin in (0, 3):
        out = ha.aggregate_over_homographies(torch.zeros(1, 1, h, w), homs, ones,
                                             {"aggregation": "mean", "valid_border_margin": margin})
        assert torch.allclose(out, torch.ones(1, h, w), atol=1e-5)


def test_round_trip_of_a_smooth_image():
    # With heatmap = image, every view unwarped lands back on the image: the aggregate equals the image
    # up to bilinear resampling of a smooth function (on the rim of a view, where its mask is interpolated
    # with the outside, the nearest inner value stands in: half a pixel of slope). A wrong warp direction
    # would be off by the image's whole range.
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = (0.5 + 0.4 * torch.sin(xs / 9) * torch.cos(ys / 7))[None, None]
    homs = torch.stack([torch.eye(3, dtype=torch.float64), about_centre(h, w, 25, 0.9),
                        about_centre(h, w, -15, 1.2, (5e-4, 5e-4)), translation(7.5, -4.25)])[None]
    for aggregation in ("mean", "max"):
        out = ha.aggregate_over_homographies(image, homs, lambda x: x[:, 0],
                                             {"aggregation": aggregation, "valid_border_margin": 2})
        assert (out[0] - image[0, 0]).abs().max() < 0.03, aggregation  # the image's range is 0.4


def test_corners_of_a_square_recovered_under_known_homographies():
    image = square_image()
    h, w = image.shape[-2:]
    homs = torch.stack([torch.eye(3, dtype=torch.float64), about_centre(h, w, 20), about_centre(h, w, -35, 0.85),
                        about_centre(h, w, 10, 1.15, (8e-4, -6e-4)), translation(-6.5, 3.25)])[None]
    heat = ha.aggregate_over_homographies(image, homs, harris, {"aggregation": "mean", "chunk": 2})
    (points, scores), = extract_keypoints(heat, threshold=0.3 * float(heat.max()), nms_radius=4, border=4)
    # Harris peaks sit about 1.5 px inside a square's corners: compare with the single pass too.
    corners = torch.tensor([[39.5, 29.5], [79.5, 29.5], [39.5, 69.5], [79.5, 69.5]])
    (single, _), = extract_keypoints(harris(image), threshold=0.3, nms_radius=4, border=4)
    assert len(points) == 4 and len(single) == 4, (points, single)
    assert torch.cdist(corners, points).min(dim=1).values.max() < 2.2, points
    assert torch.cdist(single, points).min(dim=1).values.max() <= 1.0, (single, points)
    # Each view alone, unwarped, peaks at the same corners: the views agree with each other.
    for i in range(1, homs.shape[1]):
        view = ha.aggregate_over_homographies(image, homs[:, i:i + 1], harris, {"aggregation": "max"})
        (p, _), = extract_keypoints(view, threshold=0.3 * float(view.max()), nms_radius=4, border=4)
        assert len(p) == 4 and torch.cdist(corners, p).min(dim=1).values.max() < 2.5, (i, p)


def test_chunk_size_does_not_change_the_result():
    torch.manual_seed(1)
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained"})
    images = torch.rand(2, 1, 32, 48)
    results = [ha.adapt_heatmap(images, extractor.heatmap, {"num": 5, "chunk": c}, rng=7) for c in (1, 3, 10)]
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-5)


def test_sampled_homographies_start_with_identity_and_fit_the_image():
    no_artifacts = {**ha.default_conf["homographies"]["params"], "allow_artifacts": False}
    homs = ha.sample_adaptation_homographies(2, 6, 240, 320, no_artifacts, np.random.default_rng(0))
    assert homs.shape == (2, 6, 3, 3) and homs.dtype == torch.float64
    assert torch.equal(homs[:, 0], torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert not torch.allclose(homs[0, 1], homs[1, 1])  # each image its own views
    # Pixel homographies of a patch inside the image (no artifacts): the warped view's corners come from
    # points inside the original image.
    corners = torch.tensor([[0.0, 0.0], [319.0, 0.0], [0.0, 239.0], [319.0, 239.0]], dtype=torch.float64)
    src = torch.einsum("nij,kj->nki", torch.linalg.inv(homs[0, 1:]), F.pad(corners, (0, 1), value=1.0))
    src = src[..., :2] / src[..., 2:]
    assert bool((src >= -0.5).all() and (src[..., 0] <= 319.5).all() and (src[..., 1] <= 239.5).all())


def test_default_homographies_are_the_label_exports():
    # The HPatches export's detector adaptation and the label exports draw the same kind of views.
    for name in ("magicpoint_coco_export.yaml", "magicpoint_mix_export.yaml"):
        params = load_yaml(REPO / "configs" / name)["data"]["homography_adaptation"]["homographies"]["params"]
        merged = ha.merged_conf({"homographies": {"params": params}})["homographies"]["params"]
        assert merged == ha.default_conf["homographies"]["params"], name


def test_bad_conf_values_are_reported_by_key():
    with pytest.raises(ConfigError, match="homography_adaptation.aggregation"):
        ha.merged_conf({"aggregation": "median"})
    with pytest.raises(ConfigError, match="homography_adaptation.numm"):
        ha.merged_conf({"numm": 3})
    with pytest.raises(ConfigError, match="homography_adaptation.homographies.params.patch_ration"):
        ha.merged_conf({"homographies": {"params": {"patch_ration": 0.5}}})


# ------------------------------------------------------------------------------------------ datasets

def write_image(path: Path, h=48, w=64, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    cv2.rectangle(image, (10, 8), (40, 30), (255, 255, 255), -1)
    assert cv2.imwrite(str(path), image)
    return path


def test_coco_reads_grey_resized_images_and_reports_a_missing_folder(tmp_path):
    folder = tmp_path / "COCO" / "val2014"
    bgr = np.zeros((60, 90, 3), np.uint8)
    bgr[..., 0] = 200  # pure blue: OpenCV's BGR weights give 0.114 * 200, the RGB formula 0.299 * 200
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "b.png"), bgr)
    write_image(folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    ds = Coco({"preprocessing": {"resize": [24, 32]}}, task="val", data_path=tmp_path)
    assert [s["name"] for s in ds.samples] == ["a", "b"]
    sample = ds[1]
    assert sample["image"].shape == (1, 24, 32) and sample["image"].dtype == torch.float32
    assert abs(float(sample["image"].mean()) - round(0.114 * 200) / 255) < 1e-6
    with pytest.raises(DataError, match=str(tmp_path / "COCO" / "train2014")):
        Coco({}, task="train", data_path=tmp_path)


def make_kitti(tmp_path: Path) -> Path:
    """A KITTI tree: drive 0001 with 3 frames, drive 0005 with 2; the val split also lists an absent
    drive and ends without a newline."""
    root = tmp_path / "kitti_wVal"
    for drive, n in (("2011_09_26_drive_0001_sync", 3), ("2011_09_26_drive_0005_sync", 2)):
        for i in range(n):
            write_image(root / drive / "image_02" / "data" / f"{i:010d}.png", seed=i)
    split = tmp_path / "kitti_split"
    split.mkdir()
    (split / "val.txt").write_text("2011_09_26_drive_0001_sync_02\n2011_09_28_drive_0099_sync_02\n"
                                   "2011_09_26_drive_0005_sync_02")
    return tmp_path


def test_kitti_layout_last_line_without_newline_and_absent_drive(tmp_path, caplog):
    make_kitti(tmp_path)
    conf = {"root": "kitti_wVal", "root_split_txt": "kitti_split", "preprocessing": {"resize": [32, 48]}}
    with caplog.at_level(logging.WARNING):
        ds = Kitti_inh(conf, task="val", data_path=tmp_path)  # relative paths: under DATA_PATH
    assert [s["name"] for s in ds.samples] == [
        "2011_09_26_drive_0001_sync_02/0000000000", "2011_09_26_drive_0001_sync_02/0000000001",
        "2011_09_26_drive_0001_sync_02/0000000002",
        "2011_09_26_drive_0005_sync_02/0000000000", "2011_09_26_drive_0005_sync_02/0000000001"]
    assert ds.absent_drives == ["2011_09_28_drive_0099_sync_02"]
    assert "1 of 3 drives" in caplog.text and "2011_09_28_drive_0099_sync_02" in caplog.text
    assert ds[4]["image"].shape == (1, 32, 48)
    with pytest.raises(DataError, match="train.txt"):
        Kitti_inh(conf, task="train", data_path=tmp_path)
    with pytest.raises(DataError, match="data.root folder not found"):
        Kitti_inh({**conf, "root": "nowhere"}, task="val", data_path=tmp_path)


def test_image_folder_names_mirror_the_tree(tmp_path):
    write_image(tmp_path / "imgs" / "street" / "0001.png")
    write_image(tmp_path / "imgs" / "top.JPG")
    ds = ImageFolder({"root": str(tmp_path / "imgs"), "preprocessing": {"resize": [24, 32]}})
    assert [s["name"] for s in ds.samples] == ["street/0001", "top"]
    assert ds[0]["image"].shape == (1, 24, 32)


def test_shipped_export_configs_fit_the_schema():
    for name in ("magicpoint_coco_export.yaml", "magicpoint_kitti_export.yaml"):
        raw = load_yaml(REPO / "configs" / name)
        conf = export.load_adaptation_config(str(REPO / "configs" / name))
        assert conf["data"]["homography_adaptation"]["num"] == raw["data"]["homography_adaptation"]["num"]
        assert conf["model"]["pretrained"] == raw["pretrained"]


# ------------------------------------------------------------------------------------------- export

def write_config(path: Path, weights: Path, data: str, num: int = 2) -> Path:
    path.write_text(f"""
data:
  {data}
  preprocessing:
    resize: [32, 48]
  homography_adaptation:
    num: {num}
    aggregation: sum
    homographies:
      params: {{patch_ratio: 0.85, allow_artifacts: true, perspective_amplitude_x: 0.2}}
training:
  workers_test: 2
model:
  name: SuperPointNet_pretrained
  batch_size: 1
  detection_threshold: 0.001
  nms: 2
  top_k: 50
  subpixel:
    enable: true
pretrained: {weights}
""")
    return path


def run_export(monkeypatch, tmp_path, config: Path, exper="exp", output_img=False, resume=False):
    monkeypatch.setattr(settings, "DATA_PATH", str(tmp_path))
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    args = argparse.Namespace(config=str(config), exper_name=exper, outputImg=output_img, weights=None,
                              precision=None, resume=resume, overwrite=False, max_bad_fraction=0.5)
    return export.run(args)


def test_export_kitti_writes_drive_folders(tmp_path, monkeypatch, random_weights):
    make_kitti(tmp_path)
    config = write_config(tmp_path / "kitti.yaml", random_weights,
                          "dataset: Kitti_inh\n  export_folder: val\n  root: kitti_wVal\n  root_split_txt: kitti_split")
    counts = run_export(monkeypatch, tmp_path, config, output_img=True)
    out = tmp_path / "logs" / "exp" / "predictions" / "val"
    assert counts["written"] == 5 and counts["corrupt"] == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == [
        f"2011_09_26_drive_0001_sync_02/{i:010d}.npz" for i in range(3)] + [
        f"2011_09_26_drive_0005_sync_02/{i:010d}.npz" for i in range(2)]
    label = load_npz(out / "2011_09_26_drive_0005_sync_02" / "0000000001.npz")
    assert label["image_size"].tolist() == [32, 48]  # the config's resize, for training to check
    pts = label["pts"]
    assert pts.ndim == 2 and pts.shape[1] == 3 and 0 < len(pts) <= 50
    assert np.all(np.diff(pts[:, 2]) <= 0) and np.all(pts[:, 2] >= 0.001)
    png = cv2.imread(str(out / "2011_09_26_drive_0005_sync_02" / "0000000001.png"))
    assert png.shape == (96, 144, 3)
    summary = (out / "export.txt").read_text()
    assert "exported: 5" in summary and "absent_drives: 1 (2011_09_28_drive_0099_sync_02)" in summary
    assert (tmp_path / "logs" / "exp" / "config.yml").read_text() == config.read_text()


def make_coco(tmp_path: Path, n: int = 3) -> Path:
    for i in range(n):
        write_image(tmp_path / "COCO" / "val2014" / f"im{i}.jpg", seed=i)
    return tmp_path / "COCO" / "val2014"


def test_export_resumes_and_never_mistakes_a_temporary_for_an_output(tmp_path, monkeypatch, random_weights):
    make_coco(tmp_path)
    config = write_config(tmp_path / "coco.yaml", random_weights, "dataset: Coco\n  export_folder: val")
    out = tmp_path / "logs" / "exp" / "predictions" / "val"
    out.mkdir(parents=True)
    kept = np.full((1, 3), 7.0, np.float32)
    np.savez_compressed(out / "im0.npz", pts=kept)  # finished before the interruption
    (out / ".im1.npz.k3j2_x9q.npz").write_bytes(b"PK\x03\x04 half written")  # interrupted atomic write
    counts = run_export(monkeypatch, tmp_path, config, resume=True)  # outputs without a run.json: an older run
    assert (counts["written"], counts["existing"], counts["corrupt"]) == (2, 1, 0)
    assert np.array_equal(load_npz(out / "im0.npz")["pts"], kept)
    assert load_npz(out / "im1.npz")["pts"].shape[1] == 3
    assert not list(out.glob(".*"))  # the stale temporary is gone, no new ones left
    again = run_export(monkeypatch, tmp_path, config)
    assert (again["written"], again["existing"]) == (0, 3)


def test_export_reports_and_counts_a_corrupt_image(tmp_path, monkeypatch, random_weights):
    folder = make_coco(tmp_path, 2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    config = write_config(tmp_path / "coco.yaml", random_weights, "dataset: Coco\n  export_folder: val")
    counts = run_export(monkeypatch, tmp_path, config)
    assert (counts["written"], counts["corrupt"], counts["corrupt_names"]) == (2, 1, ["broken"])
    out = tmp_path / "logs" / "exp" / "predictions" / "val"
    assert not (out / "broken.npz").exists()
    assert "corrupt: 1 (broken)" in (out / "export.txt").read_text()


def test_shards_split_the_images_without_overlap(tmp_path, random_weights):
    make_coco(tmp_path, 5)
    ds = Coco({"preprocessing": {"resize": [32, 48]}}, task="val", data_path=tmp_path)
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained", "pretrained": str(random_weights)})
    conf = ha.merged_conf({"num": 1})
    out = tmp_path / "out"
    seen = []
    for rank in range(2):
        before = set(out.glob("*.npz"))
        counts = export.export_split(ds, extractor, conf, out, rank=rank, world_size=2)
        seen.append({p.stem for p in set(out.glob("*.npz")) - before})
        assert counts["written"] == len(seen[-1])
    assert seen == [{"im0", "im2", "im4"}, {"im1", "im3"}]


def test_unknown_config_key_and_missing_weights_are_named(tmp_path, monkeypatch, random_weights):
    make_coco(tmp_path, 1)
    config = write_config(tmp_path / "coco.yaml", random_weights, "dataset: Coco\n  export_folder: val\n  resise: 3")
    with pytest.raises(ConfigError, match="data.resise"):
        run_export(monkeypatch, tmp_path, config)
    config.write_text(config.read_text().replace("dataset: Coco", "dataset: hpatches"))
    with pytest.raises(ConfigError, match="data.dataset"):
        run_export(monkeypatch, tmp_path, config)
    config.write_text(config.read_text().replace("dataset: hpatches", "dataset: Coco"))
    text = config.read_text().replace(f"pretrained: {random_weights}", "")
    config.write_text(text.replace("  resise: 3\n", ""))
    with pytest.raises(ConfigError, match="pretrained"):
        run_export(monkeypatch, tmp_path, config)


@pytest.mark.slow
def test_real_export_with_magicleap_weights(tmp_path, monkeypatch, magicleap_weights, shared_data):
    folder = tmp_path / "COCO" / "val2014"
    folder.mkdir(parents=True)
    for src in sorted((shared_data / "COCO" / "val2014").glob("*.jpg"))[:2]:
        shutil.copy(src, folder / src.name)
    config = tmp_path / "coco.yaml"
    text = (REPO / "configs" / "magicpoint_coco_export.yaml").read_text()
    text = text.replace("export_folder: train", "export_folder: val").replace("num: 100", "num: 3")
    text = text.replace("name: SuperPointNet_gauss2", "name: SuperPointNet_pretrained")
    config.write_text(text.replace("pretrained: logs/magicpoint_synth_t2/checkpoints/"
                                   "superPointNet_100000_checkpoint.pth.tar", f"pretrained: {magicleap_weights}"))
    counts = run_export(monkeypatch, tmp_path, config, output_img=True)
    assert counts["written"] == 2
    out = tmp_path / "logs" / "exp" / "predictions" / "val"
    for npz in sorted(out.glob("*.npz")):
        pts = load_npz(npz)["pts"]
        assert pts.dtype == np.float32 and pts.shape[1] == 3 and 50 < len(pts) <= 600
        assert np.all(np.diff(pts[:, 2]) <= 0) and pts[:, 2].min() >= 0.015
        assert pts[:, 0].min() >= 2 and pts[:, 0].max() <= 317 and pts[:, 1].min() >= 2 and pts[:, 1].max() <= 237
        assert np.any(pts[:, :2] != np.round(pts[:, :2]))  # sub-pixel refinement on
        assert cv2.imread(str(npz.with_suffix(".png"))).shape == (720, 960, 3)
    summary = (out / "export.txt").read_text()
    assert f"model: {magicleap_weights}" in summary and "homographies: 3" in summary


@pytest.mark.slow
def test_torchrun_shards_and_sums_the_counts(tmp_path, random_weights):
    make_coco(tmp_path, 5)
    config = write_config(tmp_path / "coco.yaml", random_weights, "dataset: Coco\n  export_folder: val", num=2)
    env = {**os.environ, "DATA_PATH": str(tmp_path), "EXPER_PATH": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "export.py",
                    "export_detector_homoAdapt", str(config), "exp"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "logs" / "exp" / "predictions" / "val"
    assert sorted(p.stem for p in out.glob("*.npz")) == [f"im{i}" for i in range(5)]
    summary = (out / "export.txt").read_text()
    assert "processes: 2" in summary and "exported: 5" in summary
