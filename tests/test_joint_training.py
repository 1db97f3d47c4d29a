"""Joint training: the COCO / KITTI / TUM training samples (labels found where the export wrote them,
warped pairs that agree with their homography), the shipped training configs, and short trainer runs
with the descriptor losses (the positive/negative distance gap widens; resume is exact)."""
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datasets import get_dataset_class
from datasets.Coco import Coco
from datasets.Kitti_inh import Kitti_inh
from datasets.Tum import Tum
from datasets.data_tools import gaussian_label_map
from pipeline import trainer as trainer_lib
from pipeline import training_settings
from utils.checkpoints import load_checkpoint
from utils.config import load_config, merge
from utils.geometry import inside_image, valid_mask, warp_image, warp_points
from utils.io import DataError, save_npz
from utils.losses import get_descriptor_loss
from utils.metrics import MatchingMetrics

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64

PAIR = {  # mild homographies: most of the warped image stays valid
    "enable": True,
    "params": {"translation": True, "rotation": True, "scaling": True, "perspective": True,
               "scaling_amplitude": 0.1, "perspective_amplitude_x": 0.1, "perspective_amplitude_y": 0.1,
               "patch_ratio": 0.85, "max_angle": 0.3, "allow_artifacts": False},
    "valid_border_margin": 3,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path: Path, seed: int, h: int = H, w: int = W) -> None:
    """A textured image: smoothed noise and a few rectangles, so every region looks different."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.5)
    image = (255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
        cv2.rectangle(image, (x, y), (x + 10, y + 8), int(rng.integers(0, 256)), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def write_labels(path: Path, seed: int, n: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(2, W - 3, n), rng.uniform(2, H - 3, n), rng.uniform(0.02, 1, n)], 1)
    save_npz(path, pts=pts.astype(np.float32))
    return pts


def make_coco(root: Path, n_train: int = 4, n_val: int = 2, unlabelled: int = 1) -> Path:
    """DATA_PATH/COCO/{train,val}2014 and EXPER_PATH/ha/predictions/{train,val}/<stem>.npz; the last
    `unlabelled` training images have no label file."""
    for task, n in (("train", n_train + unlabelled), ("val", n_val)):
        for i in range(n):
            stem = f"{task}{i:03d}"
            write_image(root / "data" / "COCO" / f"{task}2014" / f"{stem}.jpg", seed=i + (100 if task == "val" else 0))
            if i < n - (unlabelled if task == "train" else 0):
                write_labels(root / "exper" / "ha" / "predictions" / task / f"{stem}.npz", seed=i)
    return root


def coco_conf(**extra) -> dict:
    return {"labels": "ha/predictions", "preprocessing": {"resize": [H, W]},
            "gaussian_label": {"enable": True, "params": {"GaussianBlur": {"sigma": 0.7}}},
            "warped_pair": PAIR, **extra}


# ------------------------------------------------------------------------------------------ samples

def test_coco_training_sample_agrees_with_its_homography(tmp_path):
    make_coco(tmp_path)
    ds = Coco(coco_conf(), task="train", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    assert ds.training and len(ds) == 4  # the unlabelled image is skipped
    sample = ds[1]
    shapes = {"image": (1, H, W), "labels_2D": (1, H, W), "valid_mask": (1, H, W), "labels_res": (2, H, W),
              "labels_2D_gaussian": (1, H, W), "warped_img": (1, H, W), "warped_labels": (1, H, W),
              "warped_res": (2, H, W), "warped_valid_mask": (1, H, W), "warped_labels_gaussian": (1, H, W),
              "homographies": (3, 3), "inv_homographies": (3, 3)}
    assert {k: tuple(v.shape) for k, v in sample.items() if k != "name"} == shapes
    assert sample["name"] == "train001" and all(v.dtype == torch.float32 for k, v in sample.items() if k != "name")

    pts = torch.from_numpy(np.load(tmp_path / "exper/ha/predictions/train/train001.npz")["pts"][:, :2])
    expected = torch.zeros(H, W)
    expected[pts[:, 1].round().long(), pts[:, 0].round().long()] = 1
    assert torch.equal(sample["labels_2D"][0], expected)
    hom = sample["homographies"].double()
    assert torch.allclose(hom @ sample["inv_homographies"].double(), torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(hom, torch.eye(3, dtype=torch.float64), atol=1e-2)  # a real warp
    # The warped labels are the label points moved by the homography (rounded, inside the image).
    moved = warp_points(pts.double(), hom)
    moved = moved[inside_image(moved, H, W)]
    expected = torch.zeros(H, W)
    expected[moved[:, 1].round().long(), moved[:, 0].round().long()] = 1
    assert torch.equal(sample["warped_labels"][0], expected)
    assert torch.allclose(sample["warped_labels_gaussian"][0], gaussian_label_map(moved, H, W, 0.7), atol=1e-5)
    # The warped valid mask is the configured erosion of the homography's mask.
    assert torch.equal(sample["warped_valid_mask"], valid_mask((H, W), hom, erosion_radius=3)[0])


def test_coco_warped_image_is_the_clean_image_warped(tmp_path):
    make_coco(tmp_path)
    ds = Coco(coco_conf(), task="val", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    sample = ds[0]  # val: no photometric augmentation
    expected = warp_image(sample["image"][None], sample["homographies"].double())[0]
    assert torch.allclose(sample["warped_img"], expected, atol=1e-3)
    # Validation samples are the same at every access; training ones change with the epoch.
    assert torch.equal(ds[0]["homographies"], sample["homographies"])
    train = Coco(coco_conf(augmentation={"photometric": {"enable": True}}), task="train",
                 data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    train.set_epoch(0)
    first = train[0]
    assert torch.equal(train[0]["image"], first["image"])  # (seed, index, epoch)
    train.set_epoch(1)
    assert not torch.equal(train[0]["homographies"], first["homographies"])


def test_labels_made_at_another_size_are_refused(tmp_path):
    make_coco(tmp_path, n_train=2, unlabelled=0)
    labels = tmp_path / "exper" / "ha" / "predictions" / "train"
    pts = np.load(labels / "train000.npz")["pts"]
    save_npz(labels / "train000.npz", pts=pts, image_size=np.array([H, W]))  # as the export writes them
    save_npz(labels / "train001.npz", pts=pts, image_size=np.array([2 * H, 2 * W]))
    ds = Coco(coco_conf(), task="train", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    assert ds[0]["image"].shape == (1, H, W)
    with pytest.raises(DataError, match=rf"train001.npz: labels made at image size \({2 * H}, {2 * W}\)"):
        ds[1]


def test_labels_are_found_under_exper_path_then_the_working_directory(tmp_path, monkeypatch):
    make_coco(tmp_path)
    monkeypatch.chdir(tmp_path / "exper")  # `ha/predictions` now also resolves from the working directory
    ds = Coco(coco_conf(), task="train", data_path=tmp_path / "data", exper_path=tmp_path / "elsewhere")
    assert len(ds) == 4 and ds.samples[0]["labels"] == tmp_path / "exper/ha/predictions/train/train000.npz"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data.labels folder not found") as err:
        Coco(coco_conf(), task="train", data_path=tmp_path / "data", exper_path=tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere" / "ha" / "predictions") in str(err.value)
    with pytest.raises(DataError, match="no 'val' folder of labels"):
        Coco(coco_conf(labels=str(tmp_path / "exper" / "ha")), task="val", data_path=tmp_path / "data")


def test_export_mode_is_unchanged_without_labels_or_with_adaptation(tmp_path):
    make_coco(tmp_path)
    for conf in ({"preprocessing": {"resize": [H, W]}},
                 coco_conf(homography_adaptation={"enable": True, "num": 3})):
        ds = Coco(conf, task="train", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
        assert not ds.training and len(ds) == 5
        assert set(ds[0]) == {"image", "name"}


def test_kitti_training_reads_labels_per_drive(tmp_path, caplog):
    root = tmp_path / "data" / "kitti"
    for i in range(3):
        write_image(root / "2011_09_26_drive_0001_sync" / "image_02" / "data" / f"{i:010d}.png", seed=i)
    (tmp_path / "data" / "split").mkdir()
    (tmp_path / "data" / "split" / "train.txt").write_text("2011_09_26_drive_0001_sync_02\n2011_09_28_drive_0002_sync_02")
    for i in (0, 2):
        write_labels(tmp_path / "exper" / "kl" / "train" / "2011_09_26_drive_0001_sync_02" / f"{i:010d}.npz", seed=i)
    conf = {"root": "kitti", "root_split_txt": "split", "labels": "kl", "preprocessing": {"resize": [H, W]},
            "warped_pair": PAIR}
    with caplog.at_level(logging.INFO):
        ds = Kitti_inh(conf, task="train", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    assert [s["name"] for s in ds.samples] == ["2011_09_26_drive_0001_sync_02/0000000000",
                                               "2011_09_26_drive_0001_sync_02/0000000002"]
    assert "2 of 3 images have labels" in caplog.text
    sample = ds[1]
    assert sample["warped_img"].shape == (1, H, W) and sample["labels_2D"].sum() > 0


def test_tum_scenes_export_and_training(tmp_path):
    root = tmp_path / "data" / "tum"
    for scene in ("rgbd_desk", "rgbd_room"):
        for t in ("1305031452.791720", "1305031452.823674"):
            write_image(root / scene / "rgb" / f"{t}.png", seed=len(scene) + len(t))
    (root / "depth").mkdir()
    (root / "train.txt").write_text("rgbd_desk\nrgbd_room\nrgbd_absent\n")
    ds = Tum({"root": "tum", "preprocessing": {"resize": [H, W]}}, task="train", data_path=tmp_path / "data")
    assert [s["name"] for s in ds.samples] == ["rgbd_desk/1305031452.791720", "rgbd_desk/1305031452.823674",
                                               "rgbd_room/1305031452.791720", "rgbd_room/1305031452.823674"]
    assert ds.absent_scenes == ["rgbd_absent"] and ds[3]["image"].shape == (1, H, W)
    write_labels(tmp_path / "exper" / "tl" / "train" / "rgbd_room" / "1305031452.823674.npz", seed=0)
    ds = Tum({"root": "tum", "labels": "tl", "preprocessing": {"resize": [H, W]}, "warped_pair": PAIR},
             task="train", data_path=tmp_path / "data", exper_path=tmp_path / "exper")
    assert len(ds) == 1 and ds[0]["name"] == "rgbd_room/1305031452.823674" and "warped_img" in ds[0]


@pytest.mark.parametrize("name, dataset", [
    ("superpoint_coco_train_heatmap.yaml", "Coco"), ("superpoint_kitti_train_heatmap.yaml", "Kitti_inh"),
    ("superpoint_tum_train_heatmap.yaml", "Tum"), ("magicpoint_kitti_train.yaml", "Kitti_inh"),
    ("superpoint_coco_finetune_magicleap.yaml", "Coco")])
def test_shipped_training_configs_validate(name, dataset):
    conf = load_config(REPO / "configs" / name, training_settings.default_conf)
    assert conf["data"]["dataset"] == dataset
    data = merge(get_dataset_class(dataset).default_conf, conf["data"], source=name)
    loss = get_descriptor_loss(conf["model"], name)
    if name.startswith("superpoint"):
        assert data["warped_pair"]["enable"] and data["gaussian_label"]["enable"] and data["labels"]
        assert loss.func.__name__ == "sparse_descriptor_loss" and conf["model"]["lambda_loss"] == 1
    else:
        assert loss is None and data["augmentation"]["homographic"]["enable"] and not conf["retrain"]


# ------------------------------------------------------------------------------------------ training

def joint_conf(loss: str, **overrides) -> dict:
    descriptor = {"sparse": {"sparse_loss": {"enable": True, "params": {
                      "num_matching_attempts": 48, "num_masked_non_matches_per_match": 20, "lamda_d": 1,
                      "min_negative_distance": 2}}},
                  "dense": {"dense_loss": {"enable": True, "params": {"descriptor_dist": 7.5, "lambda_d": 48}}}}[loss]
    user = {
        "data": {"dataset": "Coco", **coco_conf()},
        "model": {"name": "SuperPointNet_gauss2", "batch_size": 2, "eval_batch_size": 2, "learning_rate": 1e-3,
                  "lambda_loss": 1, **descriptor},
        "training": {"workers_train": 0, "workers_val": 0},
        "train_iter": 4, "save_interval": 2, "validation_interval": 2, "tensorboard_interval": 2,
        "validation_size": 1, "seed": 0, **overrides,
    }
    return merge(training_settings.default_conf, user)


def build_trainer(tmp_path, conf, folder="exp", validate=False):
    data = dict(conf["data"])
    sets = tuple(Coco(data, task=task, seed=conf["seed"], data_path=tmp_path / "data", exper_path=tmp_path / "exper")
                 for task in ("train", "val"))
    return trainer_lib.Trainer(conf, tmp_path / folder, validate=validate, datasets=sets)


@pytest.mark.parametrize("loss", ["sparse", "dense"])
def test_a_short_run_from_random_init_separates_negatives_from_positives(tmp_path, loss):
    make_coco(tmp_path, n_train=2, unlabelled=0)
    tr = build_trainer(tmp_path, joint_conf(loss))
    batches = tr.data.batches(tr.n_iter)
    gaps, losses = [], []
    for _ in range(12):
        out, _, stepped = tr.train_step(next(batches))
        assert stepped and {"loss_desc", "positive_dist", "negative_dist"} <= set(out)
        gaps.append(float(out["negative_dist"] - out["positive_dist"]))
        losses.append(float(out["loss_desc"]))
    batches.close()
    # Random init: positives and negatives are about equally far apart; training pulls them apart.
    assert np.mean(gaps[-3:]) > np.mean(gaps[:3]) + 0.1, gaps
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_joint_training_run_validates_and_resumes_exactly(tmp_path):
    make_coco(tmp_path, n_train=4, unlabelled=0)
    conf = joint_conf("sparse")  # 4 images, batch 2: 2 iterations per epoch
    full = build_trainer(tmp_path, conf, "full", validate=True)
    summary = full.run()
    assert summary["iterations"] == 4 and summary["validation"]["negative_dist"] > 0
    assert {"loss_desc", "positive_dist", "negative_dist", "precision", "match_precision", "matches"} <= set(
        summary["validation"])
    # Stopped in the middle of an epoch (iteration 3), without validations, then resumed: the same
    # weights as the uninterrupted, validated run.
    half = build_trainer(tmp_path, {**conf, "train_iter": 3}, "resumed")
    half.run()
    resumed = build_trainer(tmp_path, {**conf, "retrain": False, "reset_iter": False,
                                       "pretrained": str(tmp_path / "resumed/checkpoints/superPointNet_3_checkpoint.pth.tar")},
                            "resumed")
    assert resumed.n_iter == 3
    resumed.run()
    a = load_checkpoint(tmp_path / "full/checkpoints/superPointNet_4_checkpoint.pth.tar")["model_state_dict"]
    b = load_checkpoint(tmp_path / "resumed/checkpoints/superPointNet_4_checkpoint.pth.tar")["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_matching_metric_by_hand():
    # 4 x 4 cells; each cell's descriptor is its own one-hot vector. The warped image is the image moved
    # right by one cell: warped cell (u + 1, v) carries the descriptor of cell (u, v).
    desc = torch.eye(16).T.reshape(1, 16, 4, 4)
    warped = torch.zeros(1, 16, 4, 4)
    warped[..., 1:] = desc[..., :3]
    heatmap, warped_heatmap = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)
    for x, y in ((11, 11), (19, 19)):
        heatmap[0, y, x] = 0.5
        warped_heatmap[0, y, x + 8] = 0.5
    right = MatchingMetrics()
    right.update(heatmap, desc, warped_heatmap, warped, translation_matrix(8.0))
    assert right.compute() == {"match_precision": 1.0, "matches": 2.0}
    wrong = MatchingMetrics()  # a homography 8 px off: both matches are wrong
    wrong.update(heatmap, desc, warped_heatmap, warped, translation_matrix(0.0))
    assert wrong.compute() == {"match_precision": 0.0, "matches": 2.0}


def translation_matrix(dx):
    return torch.tensor([[[1.0, 0.0, dx], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
