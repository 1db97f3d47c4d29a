"""Photometric primitives (the reference's augmentation names and parameters): each has its documented
effect, float32 throughout, deterministic for a seed, applied in the configured order."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from utils import photometric as ph
from utils.config import ConfigError


def rng(seed=0):
    return np.random.default_rng(seed)


def textured(h=60, w=80, lo=0.3, hi=0.7, seed=1):
    return np.random.default_rng(seed).uniform(lo, hi, (h, w)).astype(np.float32)


def test_brightness_shifts_every_pixel_by_one_bounded_offset():
    img = textured()
    deltas = []
    for seed in range(40):
        out = ph.random_brightness(img, rng(seed), max_abs_change=50)
        assert out.dtype == np.float32
        delta = out - img
        assert np.ptp(delta) < 1e-6  # one offset for the whole image (no clipping in [0.3, 0.7] +- 0.2)
        deltas.append(float(delta.mean()))
    deltas = np.array(deltas)
    assert np.all(np.abs(deltas) <= 50 / 255 + 1e-6)
    assert deltas.min() < -0.1 and deltas.max() > 0.1  # spans both signs of U(-50, 50)/255
    bright = ph.random_brightness(np.full((4, 4), 0.99, np.float32), rng(3), max_abs_change=255)
    assert bright.min() >= 0 and bright.max() <= 1


def test_brightness_keeps_float_precision():
    img = np.full((8, 8), 0.5004, np.float32)  # not a multiple of 1/255
    out = ph.random_brightness(img, rng(), max_abs_change=0)
    np.testing.assert_array_equal(out, img)


def test_contrast_scales_deviations_around_the_mean():
    img = textured(lo=0.45, hi=0.55)
    for seed in range(10):
        out = ph.random_contrast(img, rng(seed), strength_range=[0.3, 1.8])
        dev_in, dev_out = img - img.mean(), out - img.mean()
        factor = float((dev_in * dev_out).sum() / (dev_in * dev_in).sum())
        assert 0.3 <= factor <= 1.8
        np.testing.assert_allclose(dev_out, factor * dev_in, atol=1e-6)
        assert abs(out.mean() - img.mean()) < 1e-5


def test_gaussian_noise_has_the_drawn_standard_deviation():
    img = np.full((200, 200), 0.5, np.float32)
    out = ph.additive_gaussian_noise(img, rng(), stddev_range=[10, 10])
    noise = out - img
    assert out.dtype == np.float32
    assert abs(noise.std() - 10 / 255) < 0.03 * 10 / 255
    assert abs(noise.mean()) < 3 * 10 / 255 / 200
    stds = [(ph.additive_gaussian_noise(img, rng(s), stddev_range=[0, 15]) - img).std() for s in range(20)]
    assert max(stds) <= 15 / 255 * 1.05 and min(stds) < max(stds) / 2


def test_speckle_noise_sets_the_drawn_fraction_to_black_and_white():
    img = np.full((300, 300), 0.5, np.float32)
    out = ph.additive_speckle_noise(img, rng(), prob_range=[0.02, 0.02])
    black, white = (out == 0).mean(), (out == 1).mean()
    assert abs(black - 0.02) < 0.003 and abs(white - 0.02) < 0.003
    assert np.all((out == 0) | (out == 1) | (out == img))
    np.testing.assert_array_equal(ph.additive_speckle_noise(img, rng(), prob_range=[0, 0]), img)


def test_shade_darkens_smoothly_with_positive_transparency_and_lightens_with_negative():
    img = np.full((120, 160), 0.5, np.float32)
    out = ph.additive_shade(img, rng(), nb_ellipses=20, transparency_range=[0.6, 0.6], kernel_size_range=[50, 100])
    ratio = out / img
    assert out.dtype == np.float32
    assert ratio.max() <= 1 + 1e-6 and ratio.min() >= 0.4 - 1e-6  # 1 - t * mask, mask in [0, 1]
    assert ratio.min() < 0.8  # some shade was cast
    assert np.abs(np.diff(ratio, axis=1)).max() < 0.05  # blurred mask: no hard edges
    lighter = ph.additive_shade(img, rng(), nb_ellipses=20, transparency_range=[-0.5, -0.5],
                                kernel_size_range=[50, 100])
    assert lighter.min() >= 0.5 - 1e-6 and lighter.max() > 0.6


def test_motion_blur_kernel_is_a_normalised_line():
    for direction in ph.MOTION_DIRECTIONS:
        k = ph.motion_blur_kernel(7, direction)
        assert k.shape == (7, 7) and abs(k.sum() - 1) < 1e-6
        np.testing.assert_allclose(k, k[::-1, ::-1])  # symmetric about the centre
        assert np.count_nonzero(k) == 7
    k = ph.motion_blur_kernel(5, "horizontal")
    assert np.count_nonzero(k[2]) == 5 and k[2, 2] > k[2, 0]  # Gaussian-weighted along the row
    with pytest.raises(ValueError):
        ph.motion_blur_kernel(4, "horizontal")


def test_motion_blur_smears_a_dot_along_one_direction_and_keeps_the_mean():
    img = np.zeros((31, 31), np.float32)
    img[15, 15] = 1.0
    directions, sizes = set(), set()
    for seed in range(60):
        out = ph.motion_blur(img, rng(seed), max_kernel_size=7)
        assert abs(out.sum() - 1) < 1e-5  # mean preserved
        ys, xs = np.nonzero(out > 1e-7)
        dy, dx = ys - 15, xs - 15
        size = len(ys)
        sizes.add(size)
        assert size in (1, 3, 5, 7)
        if size == 1:
            continue
        if np.all(dy == 0):
            directions.add("h")
        elif np.all(dx == 0):
            directions.add("v")
        elif np.all(dx == dy):
            directions.add("down")
        else:
            assert np.all(dx == -dy), "the blur is not along a single line"
            directions.add("up")
    assert directions == {"h", "v", "down", "up"}
    assert sizes == {1, 3, 5, 7}  # every odd size up to max_kernel_size, 7 included (the reference's bug)


def test_motion_blur_of_a_constant_image_is_constant():
    img = np.full((20, 20), 0.3, np.float32)
    for seed in range(5):
        np.testing.assert_allclose(ph.motion_blur(img, rng(seed), max_kernel_size=9), img, atol=1e-6)


# The synthetic-shapes photometric parameters of the shipped config (the reference's).
SHAPES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "magicpoint_shapes_pair.yaml"
SYNTH_PARAMS = yaml.safe_load(SHAPES_CONFIG.read_text())["data"]["augmentation"]["photometric"]["params"]


def test_augmentation_is_deterministic_for_a_seed_and_float32():
    aug = ph.PhotometricAugmentation({"enable": True, "params": SYNTH_PARAMS, "random_order": True})
    img = textured(120, 160)
    a, b, c = aug(img, rng(5)), aug(img, rng(5)), aug(img, rng(6))
    assert a.dtype == np.float32 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01
    assert a.min() >= 0 and a.max() <= 1


def test_primitives_apply_in_the_configured_order():
    img = textured()
    params = {"random_brightness": {"max_abs_change": 75}, "random_contrast": {"strength_range": [0.3, 1.8]}}
    for order in (["random_contrast", "random_brightness"], ["random_brightness", "random_contrast"]):
        aug = ph.PhotometricAugmentation({"enable": True, "primitives": order, "params": params})
        r = rng(11)
        expected = img
        for name in order:
            expected = ph.PRIMITIVES[name](expected, r, **params[name])
        np.testing.assert_array_equal(aug(img, rng(11)), expected)
    only = ph.PhotometricAugmentation({"primitives": ["additive_speckle_noise"]})
    assert [fn for fn, _ in only.steps] == [ph.additive_speckle_noise]
    every = ph.PhotometricAugmentation({"primitives": "all"})
    assert [fn for fn, _ in every.steps] == list(ph.PRIMITIVES.values())


def test_random_order_varies_the_order_between_images():
    params = {"random_brightness": {"max_abs_change": 75}, "random_contrast": {"strength_range": [0.3, 1.8]}}
    aug = ph.PhotometricAugmentation({"primitives": list(params), "params": params, "random_order": True})
    img = textured()
    orders = set()
    for seed in range(20):
        out = aug(img, rng(seed))
        for order in (("random_brightness", "random_contrast"), ("random_contrast", "random_brightness")):
            r = rng(seed)
            r.permutation(2)  # the draw that chose the order
            expected = img
            for name in order:
                expected = ph.PRIMITIVES[name](expected, r, **params[name])
            if np.array_equal(out, expected):
                orders.add(order)
    assert len(orders) == 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="strength_rang"):
        ph.PhotometricAugmentation({"params": {"random_contrast": {"strength_rang": [0, 1]}}})
    with pytest.raises(ConfigError, match="motion_blurr"):
        ph.PhotometricAugmentation({"primitives": ["motion_blurr"]})


def test_enabled_for_needs_enable_and_the_split_flag():
    assert ph.PhotometricAugmentation({"enable": True}).enabled_for("train")
    assert not ph.PhotometricAugmentation({"enable": True}).enabled_for("val")
    assert not ph.PhotometricAugmentation({"enable": False}).enabled_for("train")
    assert ph.PhotometricAugmentation({"enable": True, "enable_val": True}).enabled_for("val")
