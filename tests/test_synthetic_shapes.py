"""Synthetic shapes (datasets/synthetic_shapes.py): keypoints on drawn corners, the same images as the
reference's full-resolution drawing, determinism, and the cache (manifest, regeneration, truncate)."""
import dataclasses
import json
import logging

import cv2
import numpy as np
import pytest

from datasets import synthetic_shapes as ss
from datasets import synthetic_shapes_cache as cache_lib
from utils.config import ConfigError
from utils.geometry import resize_points
from utils.io import DataError

# The shipped magicpoint_shapes_pair values.
CONF = {"preprocessing": {"resize": [120, 160], "blur_size": 21}}
REFERENCE_RES = {**CONF, "generation": {"oversampling": None}}
WITH_POINTS = [p for p in ss.PRIMITIVES if p not in ("draw_ellipses", "gaussian_noise")]


def tiny(training=4, validation=2, **extra):
    return {**CONF, "truncate": {"draw_ellipses": 0.5, "gaussian_noise": 0.5},
            "generation": {"split_sizes": {"training": training, "validation": validation, "test": 0}}, **extra}


def corner_response(image):
    """Shi-Tomasi response (smallest eigenvalue of the structure tensor), max over 3x3 neighbourhoods."""
    response = cv2.cornerMinEigenVal(image.astype(np.float32) / 255, 5, 3)
    return cv2.dilate(response, np.ones((3, 3), np.uint8))


@pytest.mark.parametrize("primitive", WITH_POINTS)
def test_keypoints_sit_on_drawn_corners(primitive):
    rng = np.random.default_rng(0)
    at_labels, at_random = [], []
    for i in range(6):
        image, points = ss.render_sample(CONF, primitive, "validation", i)
        assert image.shape == (120, 160) and image.dtype == np.uint8
        assert points.dtype == np.float32 and points.shape[1] == 2
        # (x + 0.5) / 8 - 0.5 of integer points inside the 960 x 1280 image
        assert np.all((points >= -0.5) & (points <= np.array([159.5, 119.5])))
        response = corner_response(image)
        q = np.round(points).astype(int).clip(0, [159, 119])
        at_labels += response[q[:, 1], q[:, 0]].tolist()
        at_random += response[rng.integers(0, 120, 50), rng.integers(0, 160, 50)].tolist()
    at_labels, at_random = np.array(at_labels), np.array(at_random)
    assert len(at_labels) >= 12
    assert np.median(at_labels) > 50 * np.median(at_random)
    assert np.mean(at_labels > np.percentile(at_random, 90)) > 0.85


@pytest.mark.parametrize("primitive", ["draw_ellipses", "gaussian_noise"])
def test_no_keypoints_for_ellipses_and_noise(primitive):
    for i in range(3):
        image, points = ss.render_sample(CONF, primitive, "training", i)
        assert points.shape == (0, 2) and image.std() > 1


def test_resize_points_agrees_with_the_resize_homography():
    from utils.geometry import scale_homography, warp_points_np
    points = np.array([[0.0, 0.0], [1279.0, 959.0], [400.0, 304.0], [-0.5, -0.5]])
    expected = warp_points_np(points, scale_homography(np.eye(3), (1, 1), (1 / 8, 1 / 8)))
    np.testing.assert_allclose(resize_points(points, (1 / 8, 1 / 8)), expected, atol=1e-9)
    np.testing.assert_allclose(resize_points(points[3:], (1 / 8, 1 / 8)), [[-0.5, -0.5]])  # image corner stays


def test_drawn_edges_and_keypoints_share_the_pixel_convention():
    """A rectangle filling canvas pixels 400..879 x 304..703 covers [399.5, 879.5] x [303.5, 703.5]:
    in the 120 x 160 image its edges must be at (x + 0.5) / 8 - 0.5 of those borders, within 1/10 pixel
    of its corner keypoints (resize_points of the pixel centres), and as blurred as the reference's
    (drawn at 960 x 1280, blur 21, resize) when drawn fast (480 x 640)."""
    size, out = (960, 1280), (120, 160)
    corners = np.array([[400, 304], [879, 304], [879, 703], [400, 703]])
    keypoints = resize_points(corners.astype(np.float64), (1 / 8, 1 / 8))

    def crossings(profile, level):  # where a blurred box profile crosses `level`, linearly interpolated
        above = np.flatnonzero(profile >= level)
        a, b = above[0], above[-1]
        return (a - 1 + (level - profile[a - 1]) / (profile[a] - profile[a - 1]),
                b + (profile[b] - level) / (profile[b] - profile[b + 1]))

    rise = {}
    for raster in [size, (4 * 120, 4 * 160)]:
        canvas = ss.Canvas(size, raster, blur_size=21)
        canvas.fill_polygon(corners, 255)
        image = canvas.finish(out).astype(np.float64)
        left, right = crossings(image[60], 127.5)
        top, bottom = crossings(image[:, 80], 127.5)
        np.testing.assert_allclose([left, right, top, bottom], [49.5, 109.5, 37.5, 87.5], atol=0.1)
        np.testing.assert_allclose([left, right], [keypoints[0, 0], keypoints[1, 0]], atol=0.1)
        np.testing.assert_allclose([top, bottom], [keypoints[0, 1], keypoints[2, 1]], atol=0.1)
        rise[raster] = crossings(image[60], 0.9 * 255)[0] - crossings(image[60], 0.1 * 255)[0]
    assert 0.8 < rise[size] < 1.6  # sigma 3.5 / 8 pixel: 10-90 % rise of ~1.1 pixel
    assert rise[(480, 640)] == pytest.approx(rise[size], rel=0.1)


@pytest.mark.parametrize("primitive", ss.PRIMITIVES)
def test_fast_drawing_matches_drawing_at_full_resolution(primitive):
    """The same shapes (same seeds) drawn the reference's way (960 x 1280, blur 21, resize) and the
    fast way (480 x 640, scaled blur and noise) give the same keypoints and nearly the same pixels,
    with the same edges and blur (gradient statistics) and the same contrast (std). Both draw the
    background at 120 x 160 (tested above)."""
    def gradient_p99(image):
        g = image.astype(np.float32)
        return np.percentile(np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)), 99)

    def lag1(image):  # correlation of horizontally adjacent pixels
        a = image.astype(np.float64) - image.mean()
        return np.mean(a[:, 1:] * a[:, :-1]) / a.var()

    stats = []
    for i in range(3):
        fast, fast_points = ss.render_sample(CONF, primitive, "test", i)
        ref, ref_points = ss.render_sample(REFERENCE_RES, primitive, "test", i)
        np.testing.assert_array_equal(fast_points, ref_points)
        difference = np.abs(fast.astype(np.float64) - ref)
        stats.append([difference.mean(), np.percentile(difference, 99), gradient_p99(fast) / gradient_p99(ref),
                      fast.std() / ref.std(), lag1(fast) - lag1(ref)])
    mae, p99, gradient_ratio, std_ratio, lag1_difference = np.mean(stats, axis=0)
    if primitive != "gaussian_noise":  # noise: another draw, compared by its statistics only
        assert mae < 1 and p99 < 15
    assert gradient_ratio == pytest.approx(1, abs=0.08)
    assert std_ratio == pytest.approx(1, abs=0.04)
    assert abs(lag1_difference) < 0.03


def test_background_at_output_size_matches_full_resolution():
    """The background (box-blurred by >= 150 canvas pixels) is drawn at 120 x 160: compared with the
    same draw at 960 x 1280, after the final blur and resize."""
    size, out = (960, 1280), (120, 160)
    for seed in range(3):
        images = []
        for raster in (size, out):
            canvas = ss.Canvas(size, raster, blur_size=21)
            ss.generate_background(np.random.default_rng(seed), canvas)
            images.append(canvas.finish(out).astype(np.float64))
        full, small = images
        difference = np.abs(small - full)
        assert difference.mean() < 1.5 and np.percentile(difference, 99) < 6
        assert small.std() == pytest.approx(full.std(), rel=0.05)
        assert small.mean() == pytest.approx(full.mean(), abs=1)


def test_render_is_deterministic_per_sample():
    a = ss.render_sample(CONF, "draw_star", "training", 3)
    b = ss.render_sample(CONF, "draw_star", "training", 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other_index = ss.render_sample(CONF, "draw_star", "training", 4)
    other_seed = ss.render_sample(CONF, "draw_star", "training", 3, seed=1)
    assert not np.array_equal(a[0], other_index[0]) and not np.array_equal(a[0], other_seed[0])
    # render() is the same drawing from an explicit generator
    rng = np.random.default_rng([0, ss.PRIMITIVES.index("draw_star"), ss.SPLITS.index("training"), 3])
    np.testing.assert_array_equal(ss.render("draw_star", rng, CONF)[0], a[0])


def test_split_samples_truncate_and_shuffle():
    conf = {**CONF, "truncate": {"draw_ellipses": 0.3, "draw_stripes": 0.2, "gaussian_noise": 0.1}}
    samples = ss.split_samples(conf, "training")
    assert len(samples) == 66000  # 6 x 10000 + 3000 + 2000 + 1000, as the reference
    assert len(ss.split_samples(conf, "validation")) == 1320
    counts = {p: 0 for p in ss.PRIMITIVES}
    for p, _ in samples:
        counts[p] += 1
    assert counts["draw_ellipses"] == 3000 and counts["draw_stripes"] == 2000 and counts["gaussian_noise"] == 1000
    assert {i for p, i in samples if p == "draw_stripes"} == set(range(2000))  # the first ones kept
    assert samples[:9] != sorted(samples[:9])  # shuffled
    assert samples == ss.split_samples(conf, "training")
    assert len(ss.split_samples({**conf, "primitives": ["draw_cube"]}, "training")) == 10000


def read_cache(cache, conf, split):
    return [(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), points)
            for path, points in cache_lib.load_split(cache, conf, split)]


def test_cache_counts_truncate_and_on_the_fly_equality(tmp_path):
    conf = tiny(training=10, validation=5, truncate={"draw_ellipses": 0.3, "draw_stripes": 0.2, "gaussian_noise": 0.1})
    cache = cache_lib.ensure_cache(tmp_path, conf, workers=1)
    assert cache == tmp_path / "synthetic_shapes"
    training = cache_lib.load_split(cache, conf, "training")
    validation = cache_lib.load_split(cache, conf, "validation")
    assert len(training) == 6 * 10 + 3 + 2 + 1
    assert len(validation) == 6 * 5 + 1 + 1 + 0
    assert not (cache / "draw_cube" / "images" / "test").exists()  # only the requested splits
    assert len(list((cache / "draw_stripes" / "images" / "training").glob("*.png"))) == 2  # only what is kept
    for (path, points), (p, i) in zip(training, ss.split_samples(conf, "training")):
        assert path == cache / p / "images" / "training" / f"{i}.png"
    for (path, points), (p, i) in list(zip(validation, ss.split_samples(conf, "validation")))[::4]:
        image, expected = ss.render_sample(conf, p, "validation", i)
        np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), image)
        np.testing.assert_array_equal(points, expected)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["identity"]["blur_size"] == 21 and manifest["identity"]["resize"] == [120, 160]
    assert manifest["identity"]["generator_version"] == ss.GENERATOR_VERSION


def test_cache_is_independent_of_the_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_lib, "CHUNK_SIZE", 2)  # several tasks per primitive for the two processes
    conf = tiny(training=5, validation=2, suffix="w")
    cv2.GaussianBlur(np.zeros((960, 1280), np.uint8), (21, 21), 0)  # OpenCV's thread pool in use before the fork
    one = cache_lib.ensure_cache(tmp_path / "one", conf, workers=1)
    two = cache_lib.ensure_cache(tmp_path / "two", conf, workers=2)
    assert one.name == two.name == "synthetic_shapes_w"
    for split in ("training", "validation"):
        a, b = read_cache(one, conf, split), read_cache(two, conf, split)
        assert len(a) == len(b) > 0
        for (image_a, points_a), (image_b, points_b) in zip(a, b):
            np.testing.assert_array_equal(image_a, image_b)
            np.testing.assert_array_equal(points_a, points_b)


def count_generated(monkeypatch):
    calls = []
    real = cache_lib._generate_chunk

    def counting(cache, conf, primitive, split, start, stop):
        calls.append((primitive, split, start, stop))
        return real(cache, conf, primitive, split, start, stop)

    monkeypatch.setattr(cache_lib, "_generate_chunk", counting)
    return calls


def test_cache_reused_extended_and_regenerated_on_other_parameters(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_lib, "CHUNK_SIZE", 2)
    calls = count_generated(monkeypatch)
    conf = tiny(primitives=["draw_polygon", "draw_star"])
    cache = cache_lib.ensure_cache(tmp_path, conf, workers=1)
    assert len(calls) == 2 * (2 + 1)  # 4 training + 2 validation images per primitive, 2 per chunk
    before = cv2.imread(str(cache / "draw_star" / "images" / "training" / "0.png"), cv2.IMREAD_UNCHANGED)

    calls.clear()
    cache_lib.ensure_cache(tmp_path, conf, workers=1)
    assert calls == []  # same parameters: reused

    bigger = tiny(training=6, primitives=["draw_polygon", "draw_star"])
    cache_lib.ensure_cache(tmp_path, bigger, workers=1)
    assert sorted(calls) == [("draw_polygon", "training", 4, 6), ("draw_star", "training", 4, 6)]
    assert len(cache_lib.load_split(cache, bigger, "training")) == 12

    calls.clear()
    other = tiny(primitives=["draw_polygon", "draw_star"], preprocessing={"resize": [120, 160], "blur_size": 11})
    with caplog.at_level(logging.WARNING, logger=cache_lib.__name__):
        cache_lib.ensure_cache(tmp_path, other, workers=1)
    assert "blur_size: 21 -> 11" in caplog.text and "regenerating" in caplog.text
    assert len(calls) == 6
    after = cv2.imread(str(cache / "draw_star" / "images" / "training" / "0.png"), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, ss.render_sample(other, "draw_star", "training", 0)[0])
    assert not (cache / "draw_star" / "images" / "training" / "5.png").exists()  # old images deleted
    with pytest.raises(DataError, match="ensure_cache"):
        cache_lib.load_split(cache, conf, "training")  # the cache no longer holds the old parameters


def test_cache_without_manifest_is_regenerated(tmp_path, caplog):
    conf = tiny(primitives="draw_lines")
    stale = tmp_path / "synthetic_shapes" / "draw_lines" / "images" / "training"
    stale.mkdir(parents=True)
    (stale / "99.png").write_bytes(b"stale")
    reference_tarball = tmp_path / "synthetic_shapes" / "draw_lines.tar.gz"  # the reference's format: kept
    reference_tarball.write_bytes(b"tar")
    with caplog.at_level(logging.WARNING, logger=cache_lib.__name__):
        cache = cache_lib.ensure_cache(tmp_path, conf, workers=1)
    assert "without a manifest" in caplog.text
    assert not (stale / "99.png").exists() and reference_tarball.exists()
    assert len(cache_lib.load_split(cache, conf, "training")) == 4


def test_incomplete_cache_is_a_data_error(tmp_path):
    conf = tiny(primitives="draw_cube")
    cache = cache_lib.ensure_cache(tmp_path, conf, workers=1, splits=("training",))
    with pytest.raises(DataError, match="missing"):
        cache_lib.load_split(cache, conf, "validation")


@pytest.mark.parametrize("conf, key", [
    ({"primitives": ["draw_lines", "draw_circles"]}, "data.primitives"),
    ({"truncate": {"draw_lines": 1.5}}, "data.truncate.draw_lines"),
    ({"generation": {"params": {"draw_star": {"nb_branch": 6}}}}, "data.generation.params.draw_star.nb_branch"),
    ({"generation": {"split_sizes": {"train": 10}}}, "data.generation.split_sizes.train"),
    ({"preprocessing": {"blur_size": 20}}, "data.preprocessing.blur_size"),
])
def test_bad_configuration_names_the_key(conf, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ss.render_sample(conf, "draw_lines", "training", 0)


def test_settings_are_checked_once_into_an_immutable_object():
    conf = tiny(truncate={"draw_star": "0.5"})  # numeric strings are numbers
    settings = ss.shapes_settings(conf)
    assert ss.shapes_settings(settings) is settings  # passed on as is, never re-checked
    assert dict(settings.truncate)["draw_star"] == 0.5 and settings.split_count("draw_star", "training") == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.blur_size = 3
    assert ss.split_samples(settings, "training") == ss.split_samples(conf, "training")
    image, points = ss.render_sample(settings, "draw_star", "training", 1)
    expected_image, expected_points = ss.render_sample(conf, "draw_star", "training", 1)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(points, expected_points)
