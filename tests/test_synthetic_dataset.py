"""SyntheticDataset_gaussian: sample keys, shapes and dtypes in train and val mode, labels that follow
the augmented image, seeded randomness, cached and on-the-fly modes."""
import math
import sys
import types

import numpy as np
import pytest
import torch

from utils.config import ConfigError
from utils.geometry import erode_mask
from utils.io import read_image, save_image


def _standin_generator():
    """A tiny stand-in for datasets.synthetic_shapes while it is being written: Gaussian dots."""
    mod = types.ModuleType("datasets.synthetic_shapes")
    mod.PRIMITIVES = ["dots"]
    mod.generation_defaults = {"split_sizes": {"training": 12, "validation": 4, "test": 0},
                               "image_size": [120, 160], "random_seed": 0, "params": {}}

    def render_sample(conf, split, index, seed):
        h, w = conf["preprocessing"]["resize"]
        rng = np.random.default_rng([seed, ["training", "validation", "test"].index(split), index])
        pts = np.stack([rng.uniform(12, w - 12, 8), rng.uniform(12, h - 12, 8)], -1)
        ys, xs = np.mgrid[0:h, 0:w]
        img = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.3 ** 2)) for x, y in pts)
        return (np.clip(img, 0, 1) * 200 + 20).round().astype(np.uint8), pts

    def split_length(conf, split):
        return conf["generation"]["split_sizes"][split]

    def ensure_cache(data_path, conf, workers):
        cache = data_path / f"synthetic_shapes_{conf['suffix']}"
        for split in ("training", "validation"):
            for i in range(split_length(conf, split)):
                img, pts = render_sample(conf, split, i, conf["generation"]["random_seed"])
                save_image(cache / split / f"{i}.png", img)
                np.save(cache / split / f"{i}.npy", pts)
        return cache

    def load_split(cache_dir, split, truncate):
        n = len(list((cache_dir / split).glob("*.png")))
        return [(cache_dir / split / f"{i}.png", np.load(cache_dir / split / f"{i}.npy")) for i in range(n)]

    mod.render_sample, mod.split_length = render_sample, split_length
    mod.ensure_cache, mod.load_split, mod.read_image = ensure_cache, load_split, read_image
    return mod


try:
    import datasets.synthetic_shapes  # noqa: F401
except ModuleNotFoundError:
    sys.modules["datasets.synthetic_shapes"] = _standin_generator()

from datasets.SyntheticDataset_gaussian import SyntheticDataset_gaussian  # noqa: E402

H, W = 120, 160

# The data section of configs/magicpoint_shapes_pair.yaml (reference-spec 2.1) with tiny splits.
SHAPES_PAIR = {
    "dataset": "SyntheticDataset_gaussian",
    "primitives": "all",
    "truncate": {},
    "cache_in_memory": True,
    "suffix": "test",
    "add_augmentation_to_test_set": False,
    "gaussian_label": {"enable": False, "params": {"GaussianBlur": {"sigma": 0.2}}},
    "preprocessing": {"blur_size": 21, "resize": [H, W]},
    "generation": {"split_sizes": {"training": 12, "validation": 4, "test": 0}},
    "augmentation": {
        "photometric": {
            "enable": True, "enable_train": True, "enable_val": False,
            "primitives": ["random_brightness", "random_contrast", "additive_speckle_noise",
                           "additive_gaussian_noise", "additive_shade", "motion_blur"],
            "params": {
                "random_brightness": {"max_abs_change": 75},
                "random_contrast": {"strength_range": [0.3, 1.8]},
                "additive_gaussian_noise": {"stddev_range": [0, 15]},
                "additive_speckle_noise": {"prob_range": [0, 0.0035]},
                "additive_shade": {"transparency_range": [-0.5, 0.8], "kernel_size_range": [50, 100]},
                "motion_blur": {"max_kernel_size": 7},
            },
        },
        "homographic": {
            "enable": True, "enable_train": True, "enable_val": False,
            "params": {"translation": True, "rotation": True, "scaling": True, "perspective": True,
                       "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2,
                       "patch_ratio": 0.8, "max_angle": 1.57, "allow_artifacts": True,
                       "translation_overflow": 0.05},
            "valid_border_margin": 2,
        },
    },
    "warped_pair": {
        "enable": False,
        "params": {"translation": True, "rotation": True, "scaling": True, "perspective": True,
                   "scaling_amplitude": 0.2, "perspective_amplitude_x": 0.2, "perspective_amplitude_y": 0.2,
                   "patch_ratio": 0.85, "max_angle": 1.57, "allow_artifacts": True},
        "valid_border_margin": 3,
    },
}


def conf_with(**changes):
    conf = {k: v for k, v in SHAPES_PAIR.items()}
    for dotted, value in changes.items():
        node = conf
        *parents, leaf = dotted.split("__")
        for key in parents:
            node[key] = dict(node[key])
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
    assert len(ds) == (12 if task == "train" else 4)
    sample = ds[0]
    check_keys(sample, BASE_KEYS)
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert set(sample["labels_2D"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("task", ["train", "val"])
def test_gaussian_labels_and_warped_pair_keys(data_path, task):
    conf = conf_with(gaussian_label__enable=True, warped_pair__enable=True, gaussian_label__params={"GaussianBlur": {"sigma": 1.0}})
    sample = SyntheticDataset_gaussian(conf, task, data_path=data_path)[1]
    check_keys(sample, {**BASE_KEYS, **PAIR_KEYS, "labels_2D_gaussian": (1, H, W), "warped_labels_gaussian": (1, H, W)})
    # The soft labels are the blurred labels of the same points.
    assert torch.allclose(sample["labels_2D_gaussian"].sum(), sample["labels_2D"].sum(), atol=0.5)
    assert torch.allclose(sample["homographies"] @ sample["inv_homographies"], torch.eye(3), atol=1e-4)


def test_validation_samples_are_the_clean_shapes(data_path):
    ds = SyntheticDataset_gaussian(SHAPES_PAIR, "val", data_path=data_path)
    image, points, _ = ds.shape_sample(2)
    sample = ds[2]
    assert torch.equal(sample["image"][0], torch.from_numpy(image))
    assert torch.equal(sample["valid_mask"], torch.ones(1, H, W))
    rows, cols = np.round(points[:, 1]).astype(int), np.round(points[:, 0]).astype(int)
    assert sample["labels_2D"].sum() == len(set(zip(rows, cols)))
    assert torch.all(sample["labels_2D"][0, rows, cols] == 1)
    assert torch.equal(ds[2]["image"], sample["image"])  # no randomness in validation


def test_training_labels_follow_the_augmented_image(data_path):
    conf = conf_with(augmentation__photometric__enable=False)
    ds = SyntheticDataset_gaussian(conf, "train", data_path=data_path)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    checked = 0
    for index in range(len(ds)):
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
    assert checked > 30


def test_valid_mask_is_the_eroded_warped_image_area(data_path):
    ds = SyntheticDataset_gaussian(conf_with(augmentation__photometric__enable=False), "train", data_path=data_path)
    partial = 0
    for i in range(6):
        sample = ds[i]
        seen = (sample["image"] > 0).float()[None]  # the shapes' background is never black
        mask = sample["valid_mask"][None]
        # valid pixels see the image 2 px in from the warped border (valid_border_margin 2); the
        # image also shows a 1 px interpolation band beyond that border.
        assert torch.all(mask <= erode_mask(seen, 2)) and torch.all(mask >= erode_mask(seen, 3))
        partial += bool(mask.min() == 0)
    assert partial >= 3


def test_training_randomness_is_seeded_and_fresh_on_every_access(data_path):
    a = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=3, data_path=data_path)
    b = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=3, data_path=data_path)
    c = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=4, data_path=data_path)
    first_a, first_b, first_c = a[5], b[5], c[5]
    for key in BASE_KEYS:
        assert torch.equal(first_a[key], first_b[key]), key
    assert not torch.equal(first_a["image"], first_c["image"])
    assert not torch.equal(a[5]["image"], first_a["image"])  # a second access is augmented anew


def epoch_images(data_path, torch_seed, epochs=2):
    ds = SyntheticDataset_gaussian(SHAPES_PAIR, "train", seed=0, data_path=data_path)
    torch.manual_seed(torch_seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)
    return [torch.cat([batch["image"] for batch in loader]) for _ in range(epochs)]


def test_dataloader_workers_are_reproducible_and_vary_by_epoch(data_path):
    run1, run2 = epoch_images(data_path, 7), epoch_images(data_path, 7)
    assert run1[0].shape == (12, 1, H, W)
    assert torch.equal(run1[0], run2[0]) and torch.equal(run1[1], run2[1])  # reproducible for a seed
    assert not torch.equal(run1[0], run1[1])  # a new augmentation each epoch
    assert not torch.equal(epoch_images(data_path, 8, epochs=1)[0], run1[0])


def test_on_the_fly_gives_the_cached_images(data_path):
    cached = SyntheticDataset_gaussian(SHAPES_PAIR, "val", data_path=data_path)
    fly = SyntheticDataset_gaussian(conf_with(on_the_fly=True), "val", data_path=data_path / "unused")
    assert len(fly) == len(cached)
    assert not (data_path / "unused").exists()
    for i in range(len(fly)):
        assert torch.equal(fly[i]["image"], cached[i]["image"])
        assert torch.equal(fly[i]["labels_2D"], cached[i]["labels_2D"])


def test_config_errors_name_the_key(data_path):
    with pytest.raises(ConfigError, match="valid_border_margn"):
        SyntheticDataset_gaussian(conf_with(augmentation__homographic__valid_border_margn=2), "train",
                                  data_path=data_path)
    with pytest.raises(ConfigError, match="sigma"):
        SyntheticDataset_gaussian(conf_with(gaussian_label__enable=True,
                                            gaussian_label__params={"GaussianBlur": {"sigma": 0}}),
                                  "train", data_path=data_path)
