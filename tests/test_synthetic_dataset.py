"""SyntheticDataset_gaussian: sample keys, shapes and dtypes in train and val mode, labels that follow
the augmented image, seeded randomness, cached and on-the-fly modes."""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datasets.data_tools import points_to_label_map, sample_pixel_homography
from datasets.SyntheticDataset_gaussian import SyntheticDataset_gaussian
from utils.config import ConfigError
from utils.geometry import inside_image, valid_mask, warp_image, warp_points

# The reference's synthetic-shapes photometric augmentation, as the shipped config has it.
SYNTH_PHOTOMETRIC = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "magicpoint_shapes_pair.yaml")
                                   .read_text())["data"]["augmentation"]["photometric"]

H, W = 120, 160
HOMOGRAPHIC = {"translation": True, "rotation": True, "scaling": True, "perspective": True,
               "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2,
               "patch_ratio": 0.8, "max_angle": 1.57, "allow_artifacts": True, "translation_overflow": 0.05}

# The data section of configs/magicpoint_shapes_pair.yaml (the reference's MagicPoint config), with small splits:
# 66 training images (6 x 10 + 3 + 2 + 1, as 66,000) and 32 validation images.
SHAPES_PAIR = {
    "dataset": "SyntheticDataset_gaussian",
    "primitives": "all",
    "truncate": {"draw_ellipses": 0.3, "draw_stripes": 0.2, "gaussian_noise": 0.1},
    "cache_in_memory": True,
    "suffix": "v6",
    "add_augmentation_to_test_set": False,
    "gaussian_label": {"enable": False, "params": {"GaussianBlur": {"sigma": 0.2}}},
    "preprocessing": {"blur_size": 21, "resize": [H, W]},
    "augmentation": {
        "photometric": SYNTH_PHOTOMETRIC,
        "homographic": {"enable": True, "enable_train": True, "enable_val": False, "params": HOMOGRAPHIC,
                        "valid_border_margin": 2},
    },
    "warped_pair": {
        "enable": False,
        "params": {"translation": True, "rotation": True, "scaling": True, "perspective": True,
                   "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2,
                   "patch_ratio": 0.85, "max_angle": 1.57, "allow_artifacts": True},
        "valid_border_margin": 3,
    },
    # Not in the reference config: small splits, and one generation process.
    "generation": {"split_sizes": {"training": 10, "validation": 5, "test": 0}},
    "workers": 1,
}


def conf_with(**changes):
    """SHAPES_PAIR with changes given as a__b__c=value for the key a.b.c."""
    conf = copy.deepcopy(SHAPES_PAIR)
    for dotted, value in changes.items():
        node = conf
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return conf


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


BASE_KEYS = {"image": (1, H, W), "labels_2D": (1, H, W), "valid_mask": (1, H, W), "labels_res": (2, H, W)}
PAIR_KEYS = {"warped_img": (1, H, W), "warped_labels": (1, H, W), "warped_res": (2, H, W),
             "warped_valid_mask": (1, H, W), "homographies": (3, 3), "inv_homographies": (3, 3)}


def check_keys(sample, expected):
    assert set(sample) == set(expected) | {"name"}
    assert isinstance(sample["name"], str)
    for key, shape in expected.items():
        assert sample[key].shape == shape and sample[key].dtype == torch.float32, key


@pytest.mark.parametrize("task", ["train", "val"])
def test_sample_keys_shapes_and_dtypes(data_path, task):
    ds = SyntheticDataset_gaussian(SHAPES_PAIR, task, data_path=data_path)
    assert len(ds) == (66 if task == "train" else 32)
    assert (data_path / "synthetic_shapes_v6").is_dir()
    for index in (0, len(ds) - 1):
        sample = ds[index]
        check_keys(sample, BASE_KEYS)
        assert 0 <= sample["image"].min() and sample["image"].max() <= 1
        assert set(sample["labels_2D"].unique().tolist()) <= {0.0, 1.0}
        assert sample["labels_res"].abs().max() <= 0.5


@pytest.mark.parametrize("task", ["train", "val"])
def test_gaussian_labels_and_warped_pair_keys(data_path, task):
    conf = conf_with(gaussian_label__enable=True, warped_pair__enable=True,
                     gaussian_label__params={"GaussianBlur": {"sigma": 1.0}})
    ds = SyntheticDataset_gaussian(conf, task, data_path=data_path)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p == "draw_checkerboard")
    sample = ds[index]
    check_keys(sample, {**BASE_KEYS, **PAIR_KEYS, "labels_2D_gaussian": (1, H, W),
                        "warped_labels_gaussian": (1, H, W)})
    soft, hard = sample["labels_2D_gaussian"], sample["labels_2D"]
    assert hard.sum() > 0 and soft.sum() <= hard.sum() + 1e-4  # unit mass per point, less off the image
    assert soft[hard > 0].min() > 0 and torch.count_nonzero(soft) > torch.count_nonzero(hard)
    assert torch.allclose(sample["homographies"] @ sample["inv_homographies"], torch.eye(3), atol=1e-4)


def test_validation_samples_are_the_clean_shapes(data_path):
    ds = SyntheticDataset_gaussian(SHAPES_PAIR, "val", data_path=data_path)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p == "draw_cube")
    image, points = ds.shape_sample(index)
    sample = ds[index]
    assert torch.equal(sample["image"][0], torch.from_numpy(image))
    assert torch.equal(sample["valid_mask"], torch.ones(1, H, W))
    kept = points[inside_image(torch.from_numpy(points), H, W).numpy()]
    rows, cols = np.round(kept[:, 1]).astype(int), np.round(kept[:, 0]).astype(int)
    assert len(kept) > 0 and sample["labels_2D"].sum() == len(set(zip(rows, cols)))
    assert torch.all(sample["labels_2D"][0, rows, cols] == 1)
    assert torch.equal(ds[index]["image"], sample["image"])  # no randomness in validation


def test_training_sample_is_one_homography_of_the_shape(data_path):
    """Image, labels and valid mask of a training sample all come from the same warp of the shape."""
    conf = conf_with(augmentation__photometric__enable=False)
    ds = SyntheticDataset_gaussian(conf, "train", seed=5, data_path=data_path)
    twin = SyntheticDataset_gaussian(conf, "train", seed=5, data_path=data_path)
    for index in range(0, 66, 11):
        sample = ds[index]
        image, points = twin.shape_sample(index)
        hom = torch.from_numpy(sample_pixel_homography(twin.rng(index), HOMOGRAPHIC, H, W))
        expected = warp_image(torch.from_numpy(image)[None, None], hom)[0]
        assert torch.allclose(sample["image"], expected, atol=1e-5)
        moved = warp_points(torch.from_numpy(points).double(), hom)
        moved = moved[inside_image(moved, H, W)]
        assert torch.equal(sample["labels_2D"][0], points_to_label_map(moved, H, W))
        assert torch.equal(sample["valid_mask"], valid_mask((H, W), hom, erosion_radius=2)[0])


class DotsDataset(SyntheticDataset_gaussian):
    """The synthetic dataset's pipeline on images of Gaussian dots at sub-pixel keypoints."""

    def shape_sample(self, index):
        rng = np.random.default_rng(index)
        pts = np.stack([rng.uniform(15, W - 15, 6), rng.uniform(15, H - 15, 6)], -1)
        ys, xs = np.mgrid[0:H, 0:W]
        img = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.3 ** 2)) for x, y in pts)
        return (0.1 + 0.8 * np.clip(img, 0, 1)).astype(np.float32), pts.astype(np.float32)


def test_training_labels_follow_the_augmented_image(data_path):
    conf = conf_with(on_the_fly=True, augmentation__photometric__primitives=["random_brightness", "random_contrast"])
    ds = DotsDataset(conf, "train", data_path=data_path)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    checked = 0
    for index in range(40):
        sample = ds[index]
        image, mask, labels = sample["image"][0], sample["valid_mask"][0], sample["labels_2D"][0]
        for r, c in torch.nonzero(labels).tolist():
            window = (slice(r - 4, r + 5), slice(c - 4, c + 5))
            if not (4 <= r < H - 4 and 4 <= c < W - 4) or mask[window].min() < 1 or labels[window].sum() > 1:
                continue  # near the border or another dot
            x, y = c + float(sample["labels_res"][0, r, c]), r + float(sample["labels_res"][1, r, c])
            win = image[window] - image[window].min()
            mx, my = float((win * xs[window]).sum() / win.sum()), float((win * ys[window]).sum() / win.sum())
            assert math.hypot(mx - x, my - y) < 0.5, (index, x, y, mx, my)
            checked += 1
    assert checked > 60


def test_training_randomness_is_seeded_and_fresh_on_every_access(data_path):
    a = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=3, data_path=data_path)
    b = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=3, data_path=data_path)
    c = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=4, data_path=data_path)
    first_a, first_b, first_c = a[5], b[5], c[5]
    for key in BASE_KEYS:
        assert torch.equal(first_a[key], first_b[key]), key
    assert not torch.equal(first_a["image"], first_c["image"])
    assert not torch.equal(a[5]["image"], first_a["image"])  # a second access is augmented anew


def epoch_images(data_path, torch_seed, epochs=2, workers=2, set_epoch=False):
    conf = conf_with(generation__split_sizes={"training": 2, "validation": 5, "test": 0})  # 12 images
    ds = SyntheticDataset_gaussian(conf, "train", seed=0, data_path=data_path)
    torch.manual_seed(torch_seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    images = []
    for epoch in range(epochs):
        if set_epoch:
            ds.set_epoch(epoch)
        images.append(torch.cat([batch["image"] for batch in loader]))
    return images


def test_dataloader_workers_are_reproducible_and_vary_by_epoch(data_path):
    run1, run2 = epoch_images(data_path, 7), epoch_images(data_path, 7)
    assert run1[0].shape == (12, 1, H, W)
    assert torch.equal(run1[0], run2[0]) and torch.equal(run1[1], run2[1])  # reproducible for a seed
    assert not torch.equal(run1[0], run1[1])  # a new augmentation each epoch
    assert not torch.equal(epoch_images(data_path, 8, epochs=1)[0], run1[0])


def test_set_epoch_makes_augmentations_depend_on_seed_epoch_and_index_only(data_path):
    with_workers = epoch_images(data_path, 1, workers=2, set_epoch=True)
    in_process = epoch_images(data_path, 2, workers=0, set_epoch=True)
    assert torch.equal(with_workers[0], in_process[0]) and torch.equal(with_workers[1], in_process[1])
    assert not torch.equal(with_workers[0], with_workers[1])
    ds = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=0, data_path=data_path)
    ds.set_epoch(3)
    assert torch.equal(ds[7]["image"], ds[7]["image"])  # a resumed epoch repeats its augmentations


def test_on_the_fly_gives_the_cached_images(data_path):
    cached = SyntheticDataset_gaussian(SHAPES_PAIR, "val", data_path=data_path)
    fly = SyntheticDataset_gaussian(conf_with(on_the_fly=True), "val", data_path=data_path / "unused")
    assert len(fly) == len(cached) and fly.samples == cached.samples
    assert not (data_path / "unused").exists()
    for i in range(0, len(fly), 3):
        a, b = fly[i], cached[i]
        assert a["name"] == b["name"]
        for key in BASE_KEYS:
            assert torch.equal(a[key], b[key]), key


def test_config_errors_name_the_key(data_path):
    with pytest.raises(ConfigError, match="valid_border_margn"):
        SyntheticDataset_gaussian(conf_with(augmentation__homographic__valid_border_margn=2), "train",
                                  data_path=data_path)
    with pytest.raises(ConfigError, match="sigma"):
        SyntheticDataset_gaussian(conf_with(gaussian_label__enable=True,
                                            gaussian_label__params={"GaussianBlur": {"sigma": 0}}),
                                  "train", data_path=data_path)
    with pytest.raises(ConfigError, match="resize"):
        SyntheticDataset_gaussian(conf_with(preprocessing__resize=[100, 150]), "val", data_path=data_path)
    with pytest.raises(ValueError, match="task"):
        SyntheticDataset_gaussian(SHAPES_PAIR, "test", data_path=data_path)
