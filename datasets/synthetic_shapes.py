"""Synthetic shapes: the nine drawing primitives of the reference, their keypoints, and the checked
generation settings. The disk cache of rendered samples is datasets/synthetic_shapes_cache.py.

Public API (what `SyntheticDataset_gaussian` builds on)
------------------------------------------------------
PRIMITIVES                      the nine primitive names, in the reference's order
SPLITS                          ("training", "validation", "test")
generation_defaults             the `data` keys this module reads, with the reference's defaults; combine
                                them into the dataset's default_conf (`utils.config.combine`)
shapes_settings(conf, source)   -> ShapesSettings: those keys checked once, as an immutable object that
                                every function below takes (they also accept a raw data section, which
                                they check first)
render(primitive, rng, settings) -> (image uint8 (H, W), points float32 (N, 2) x, y): one sample,
                                background included, drawn, blurred and resized to `preprocessing.resize`
split_samples(settings, split)  -> [(primitive, index), ...]: the split in dataset order (primitives in
                                PRIMITIVES order, each truncated to int(truncate * split_size), then
                                shuffled with a permutation seeded by `generation.random_seed`)
render_sample(settings, primitive, split, index, seed=None)
                                -> (image, points) of one sample, deterministic in (seed, primitive, split,
                                index); the on-the-fly mode (no disk), pixel-identical to the cached image
Canvas, generate_background and the nine primitives (`draw_lines(rng, canvas, nb_lines=10)` ...) are
the building blocks of `render`: each primitive draws on a Canvas that already holds the background
and returns its keypoints in canvas pixels.

Points are always (x, y) in pixels of the returned image, with the project's convention
(utils.geometry: pixel centres at integers). Rendering in forked DataLoader workers is fine; do not call
cv2.setNumThreads inside a forked process (OpenCV then deadlocks).

How samples are drawn (as the reference's synthetic_dataset.py, faster)
--------------------------------------------------
Every primitive samples its shapes as the reference does, in the coordinates of an `image_size` image
(960 x 1280, "canvas pixels"), with keypoints at integer canvas pixels. The reference then draws at
960 x 1280, applies `cv2.GaussianBlur` (blur_size x blur_size, sigma from the kernel size) and resizes
to 120 x 160 with INTER_LINEAR; that costs ~8 ms per image, and ~130 ms for draw_multiple_polygons,
whose every polygon gets a 3,000-blob texture drawn and blurred at full size. Here:
* a `Canvas` draws the shapes straight onto a raster of `oversampling` x `resize` pixels (480 x 640 by
  default) with sub-pixel coordinates (OpenCV's `shift`), sizing lines, discs and ellipses to cover
  what the reference's calls covered, and scales the final blur (same sigma in output pixels) and the
  noise (same standard deviation after the blur and resize);
* the background, box-blurred by >= 150 canvas pixels (19 output pixels), is drawn at the output size
  and upsampled;
* a polygon's texture, box-blurred by >= 50 canvas pixels (6 output pixels), is painted only around
  the polygon, at twice the output size, with vectorised disc stamps (`_last_disc`), then upsampled.
`oversampling: null` draws the shapes at `image_size` as the reference does (the background still at
the output size): tests/test_synthetic_shapes.py compares both, image by image.

Differences from the reference, all deliberate: one seeded `np.random.Generator` per image (the
reference mixed a seeded RandomState with the unseeded global one); points stored (x, y) in the
output's pixel convention, (x + 0.5) s - 0.5, instead of (y, x) scaled by s; only the images that
`truncate` keeps and only the requested splits are generated (images depend on their index only, so a
larger set later reuses them); `gaussian_noise` skips the background it would overwrite anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Mapping, Optional

import cv2
import numpy as np

from utils.config import OPEN, ConfigError, check_int, check_list, check_number, merge
from utils.geometry import resize_points

PRIMITIVES = (
    "draw_lines",
    "draw_polygon",
    "draw_multiple_polygons",
    "draw_ellipses",
    "draw_star",
    "draw_checkerboard",
    "draw_stripes",
    "draw_cube",
    "gaussian_noise",
)
SPLITS = ("training", "validation", "test")
# Bump whenever a change to this module changes the images or points it produces (the cache keeps it).
GENERATOR_VERSION = 2

generation_defaults = {
    "primitives": "all",
    "truncate": OPEN,  # {primitive: fraction of its files kept}; checked in shapes_settings
    "suffix": None,
    "generation": {
        "split_sizes": {"training": 10000, "validation": 200, "test": 500},
        "image_size": [960, 1280],
        "random_seed": 0,
        # Drawing resolution as a multiple of preprocessing.resize; null draws at image_size (reference).
        "oversampling": 4,
        "params": {
            "generate_background": {"nb_blobs": 100, "min_rad_ratio": 0.02, "max_rad_ratio": 0.031,
                                    "min_kernel_size": 150, "max_kernel_size": 500},
            "draw_lines": {"nb_lines": 10},
            "draw_polygon": {"max_sides": 8},
            "draw_multiple_polygons": {"max_sides": 8, "nb_polygons": 30, "nb_blobs": 3000,
                                       "kernel_boundaries": [50, 100]},
            "draw_ellipses": {"nb_ellipses": 20},
            "draw_star": {"nb_branches": 6},
            "draw_checkerboard": {"max_rows": 7, "max_cols": 7, "transform_params": [0.05, 0.15]},
            "draw_stripes": {"max_nb_cols": 13, "min_width_ratio": 0.04, "transform_params": [0.1, 0.1]},
            "draw_cube": {"min_size_ratio": 0.2, "scale_interval": [0.4, 0.6], "trans_interval": [0.5, 0.2]},
            "gaussian_noise": {},
        },
    },
    "preprocessing": {"resize": [240, 320], "blur_size": 11},
}

_SHIFT = 4  # OpenCV fixed-point bits: shapes are placed to 1/16 raster pixel
_FIXED_LIMIT = 2.0 ** 30  # |fixed-point raster coordinate| bound: int32
_TEXTURE_MAX_RADIUS = 19  # blobs of the polygons' texture: radius randint(20), canvas pixels
_PHASES = 8  # disc stamps are precomputed for centres on a 1/8 raster-pixel grid


# ----------------------------------------------------------------------------------------------------
# Canvas


class Canvas:
    """A raster that stands for an image of `size` (H, W) pixels: the primitives' drawing surface.

    Primitives give coordinates and lengths in canvas pixels (the reference's 960 x 1280 image); the
    canvas maps a canvas pixel centre x to the raster coordinate (x + 0.5) s - 0.5 and draws with
    sub-pixel precision. OpenCV fills cover the pixels within half a pixel of a shape's outline, at
    whichever resolution they run; lines, discs and ellipses are sized so that they cover what the
    reference's calls covered at the canvas resolution. Polygons keep half a raster pixel of outline
    (the reference: half a canvas pixel), 1/16 of an output pixel at the default 4x oversampling.

    image: (h, w) uint8 raster. scale: (sx, sy) raster pixels per canvas pixel.
    blur_size: the reference's final Gaussian kernel size in canvas pixels (see `finish`).
    texture_step: raster pixels per pixel of the grid the polygons' blurred textures are painted on.
    """

    def __init__(self, size, raster_shape, blur_size: int, texture_step: int = 1):
        self.size = (int(size[0]), int(size[1]))
        self.image = np.zeros(tuple(int(v) for v in raster_shape), np.uint8)
        self.scale = np.array([raster_shape[1] / size[1], raster_shape[0] / size[0]])
        self.blur_size = int(blur_size)
        if raster_shape[0] % texture_step or raster_shape[1] % texture_step:
            raise ValueError(f"texture_step {texture_step} does not divide the raster shape {raster_shape}")
        self.texture_step = int(texture_step)
        self._background_color = None

    def to_raster(self, points) -> np.ndarray:
        """(..., 2) canvas x, y -> raster x, y (float64)."""
        return (np.asarray(points, dtype=np.float64) + 0.5) * self.scale - 0.5

    def _fixed_point(self, x: float, y: float) -> tuple:
        """One canvas point -> OpenCV fixed-point raster point (plain Python: called per line end)."""
        u = ((x + 0.5) * self.scale[0] - 0.5) * (1 << _SHIFT)
        v = ((y + 0.5) * self.scale[1] - 0.5) * (1 << _SHIFT)
        return (int(round(min(max(u, -_FIXED_LIMIT), _FIXED_LIMIT))),
                int(round(min(max(v, -_FIXED_LIMIT), _FIXED_LIMIT))))

    def mean(self) -> int:
        """int(mean grey level) of the raster."""
        return int(cv2.mean(self.image)[0])

    @property
    def background_color(self) -> int:
        """The mean grey level of the background, as the primitives use it for contrast: set by
        `render` from the background it drew (so that every raster size gets the same value, hence
        the same colours), else the current mean."""
        return self.mean() if self._background_color is None else self._background_color

    @background_color.setter
    def background_color(self, value: int) -> None:
        self._background_color = int(value)

    def box_kernel(self, size: int) -> tuple:
        """Raster size (kx, ky) of a box blur of `size` canvas pixels."""
        return _box_kernel(size, self.scale)

    def fill_polygon(self, points, color) -> None:
        """cv2.fillPoly of the canvas polygon (N, 2)."""
        cv2.fillPoly(self.image, [_fixed(self.to_raster(points))], int(color), cv2.LINE_8, _SHIFT)

    def ellipse(self, centre, axes, angle_deg: float, color) -> None:
        """cv2.ellipse(img, centre, axes, angle, 0, 360, color, -1) of the canvas (exact when the raster
        keeps the canvas's aspect ratio, as the reference's resizes do)."""
        # Both fills cover half a pixel beyond the outline: half a canvas pixel for the reference.
        a, b = ((v + 0.5) * s - 0.5 for v, s in zip(axes, self.scale))
        axes = (int(round(max(a, 0) * (1 << _SHIFT))), int(round(max(b, 0) * (1 << _SHIFT))))
        cv2.ellipse(self.image, self._fixed_point(*centre), axes, float(angle_deg), 0, 360, int(color), -1,
                    cv2.LINE_8, _SHIFT)

    def line(self, p1, p2, thickness: int, color) -> None:
        """cv2.line(img, p1, p2, color, thickness) of the canvas: 2 ceil(t / 2) + 1 pixels wide
        (what OpenCV covers at thickness t), with round caps. Plain Python arithmetic: a few points."""
        (x1, y1), (x2, y2) = (float(v) for v in p1), (float(v) for v in p2)
        color = int(color)
        half = (2 * math.ceil(thickness / 2) + 1) / 2
        length = math.hypot(x2 - x1, y2 - y1)
        if length > 0:
            k = max(half - 0.5 / self.scale.mean(), 0) / length  # the fill adds half a raster pixel
            nx, ny = (y1 - y2) * k, (x2 - x1) * k
            body = [self._fixed_point(x1 + nx, y1 + ny), self._fixed_point(x2 + nx, y2 + ny),
                    self._fixed_point(x2 - nx, y2 - ny), self._fixed_point(x1 - nx, y1 - ny)]
            cv2.fillPoly(self.image, [np.array(body, np.int32)], color, cv2.LINE_8, _SHIFT)
        # Caps: discs of radius `half`; the sub-pixel ellipse adds half a raster pixel too.
        axes = tuple(int(round(max(half * s - 0.5, 0) * (1 << _SHIFT))) for s in self.scale)
        for x, y in ((x1, y1), (x2, y2)):
            cv2.ellipse(self.image, self._fixed_point(x, y), axes, 0, 0, 360, color, -1, cv2.LINE_8, _SHIFT)

    def noise_gain(self, box_size: int | None = None) -> float:
        """Factor on per-pixel noise deviations that gives noise drawn on the raster the standard
        deviation it would have after the same filtering at the canvas resolution.

        box_size: a box blur of that many canvas pixels dominates (the background); None: the final
        Gaussian blur followed by the resize's two-tap average (`gaussian_noise`).
        """
        if box_size is not None:
            kx, ky = self.box_kernel(box_size)
            return math.sqrt(kx * ky) / box_size

        def energy(ksize, sigma):  # sum of squared weights of blur then two-tap average, one axis
            k = np.convolve(cv2.getGaussianKernel(ksize, sigma)[:, 0], [0.5, 0.5])
            return float(np.sum(k ** 2))

        sigma = _blur_sigma(self.blur_size)
        ref = energy(self.blur_size, sigma) ** 2
        ours = np.prod([energy(k, sigma * s) for k, s in zip(self._gauss_ksize(), self.scale)])
        return math.sqrt(ref / ours)

    def _gauss_ksize(self) -> tuple:
        return tuple(2 * math.ceil((self.blur_size // 2) * s - 1e-9) + 1 for s in self.scale)

    def finish(self, out_shape) -> np.ndarray:
        """The reference's final blur (blur_size x blur_size Gaussian at the canvas resolution), then
        INTER_LINEAR resize to out_shape (h, w). Returns uint8 (h, w)."""
        kx, ky = self._gauss_ksize()
        sigma = _blur_sigma(self.blur_size)
        blurred = cv2.GaussianBlur(self.image, (kx, ky), sigmaX=sigma * self.scale[0],
                                   sigmaY=sigma * self.scale[1])
        return cv2.resize(blurred, (int(out_shape[1]), int(out_shape[0])), interpolation=cv2.INTER_LINEAR)


def _box_kernel(size: int, scale) -> tuple:
    """(kx, ky) of a box blur of `size` canvas pixels on a grid of `scale` (sx, sy) pixels per canvas pixel."""
    return tuple(max(1, int(round(size * s))) for s in scale)


def _blur_sigma(ksize: int) -> float:
    """OpenCV's sigma for GaussianBlur(ksize, 0)."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def _fixed(raster_points) -> np.ndarray:
    """Raster x, y -> int32 fixed-point (N, 1, 2) for OpenCV's `shift` argument."""
    p = np.clip(np.asarray(raster_points, dtype=np.float64) * (1 << _SHIFT), -_FIXED_LIMIT, _FIXED_LIMIT)
    return np.round(p).astype(np.int32).reshape(-1, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Random helpers shared by the primitives


def _random_color(rng: np.random.Generator, background_color: int, n: int | None = None):
    """Grey level(s) in 0..255 at least 30 away from the background (else shifted by 128)."""
    c = rng.integers(256, size=n)
    return np.where(np.abs(c - background_color) < 30, (c + 128) % 256, c)


def _different_color(rng: np.random.Generator, previous, min_dist: int = 50, max_count: int = 20) -> int:
    """A grey level at least `min_dist` from every previous one (after at most `max_count` redraws)."""
    color = int(rng.integers(256))
    for _ in range(max_count):
        if all(abs(p - color) >= min_dist for p in previous):
            break
        color = int(rng.integers(256))
    return color


def _uniform_bytes(rng: np.random.Generator, shape) -> np.ndarray:
    """Uniform 0..255 uint8 noise (the fastest noise numpy draws; the reference's cv2.randu is 0..254),
    from a child generator: `rng` advances by one draw whatever the raster size, so the shapes drawn
    after the noise do not depend on the resolution."""
    return np.random.default_rng(int(rng.integers(2 ** 63))).integers(0, 256, size=shape, dtype=np.uint8)


def _ccw(a, b, c) -> np.ndarray:
    return (c[..., 1] - a[..., 1]) * (b[..., 0] - a[..., 0]) > (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])


def _crosses(existing: np.ndarray, new: np.ndarray) -> bool:
    """Whether any of the segments `new` (N, 4: x1 y1 x2 y2) crosses any of `existing` (M, 4)."""
    if len(existing) == 0:
        return False
    a, b = existing[:, None, :2], existing[:, None, 2:]
    c, d = new[None, :, :2], new[None, :, 2:]
    return bool(np.any((_ccw(a, c, d) != _ccw(b, c, d)) & (_ccw(a, b, c) != _ccw(a, b, d))))


def _inside(points: np.ndarray, size) -> np.ndarray:
    """The points (N, 2) whose integer coordinates lie in an image of `size` (H, W)."""
    keep = (points[:, 0] >= 0) & (points[:, 0] < size[1]) & (points[:, 1] >= 0) & (points[:, 1] < size[0])
    return points[keep]


def _random_polygons(rng: np.random.Generator, size, max_sides: int, count: int) -> list:
    """`count` of the reference's random polygons: 3..max_sides-1 corners in the angular slices of a
    circle of random radius, each coordinate at its own random fraction (>= 0.4) of the radius;
    repeated corners and corners flatter than 120 degrees removed.
    Returns [(corners (K, 2) int, centre (cx, cy), radius), ...]; K may fall below 3."""
    h, w = size
    min_dim = min(h, w)
    n = rng.integers(3, max_sides, count)
    rad = np.maximum(rng.random(count) * min_dim / 2, min_dim / 10)
    cx = rng.integers(rad.astype(int), (w - rad).astype(int))
    cy = rng.integers(rad.astype(int), (h - rad).astype(int))
    u = rng.random((count, max_sides - 1, 3))  # per corner: position in its slice, x and y radial fractions
    angle = (np.arange(max_sides - 1) + u[..., 0]) * (2 * math.pi / n[:, None])
    x = (cx[:, None] + np.maximum(u[..., 1], 0.4) * rad[:, None] * np.cos(angle)).astype(int).tolist()
    y = (cy[:, None] + np.maximum(u[..., 2], 0.4) * rad[:, None] * np.sin(angle)).astype(int).tolist()
    polygons = []
    for k in range(count):  # plain Python: at most 7 corners each
        corners = list(zip(x[k][:n[k]], y[k][:n[k]]))
        corners = [c for i, c in enumerate(corners) if c != corners[i - 1]]
        m = len(corners)
        if m >= 3:
            corners = [c for i, c in enumerate(corners)
                       if _corner_angle(corners[i - 1], c, corners[(i + 1) % m]) < 2 * math.pi / 3]
        polygons.append((np.array(corners, dtype=int).reshape(-1, 2), (int(cx[k]), int(cy[k])), float(rad[k])))
    return polygons


def _corner_angle(prev, corner, nxt) -> float:
    """Angle at `corner` between the directions to its neighbours, in radians."""
    ax, ay = prev[0] - corner[0], prev[1] - corner[1]
    bx, by = nxt[0] - corner[0], nxt[1] - corner[1]
    cos = (ax * bx + ay * by) / (math.hypot(ax, ay) * math.hypot(bx, by))
    return math.acos(min(max(cos, -1.0), 1.0))


def _warp_board(rng: np.random.Generator, size, points: np.ndarray, transform_params) -> np.ndarray:
    """The reference's random affine transformation then homography of a board's points (N, 2);
    returns the warped points truncated to int, as the reference does."""
    h, w = size
    alpha = max(h, w) * (transform_params[0] + rng.random() * transform_params[1])
    # The reference builds its reference square from (H // 2, W // 2) used as (x, y): kept, since it
    # shapes the distribution of the transformations.
    centre = np.float32([h // 2, w // 2])
    half = min(h, w) // 3
    square = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half,
                         [centre[0] - half, centre[1] + half]])
    moved = (square + rng.uniform(-alpha, alpha, size=square.shape)).astype(np.float32)
    affine = cv2.getAffineTransform(square[:3], moved[:3])
    moved = (square + rng.uniform(-alpha / 2, alpha / 2, size=square.shape)).astype(np.float32)
    perspective = cv2.getPerspectiveTransform(square, moved)
    p = points @ affine[:, :2].T + affine[:, 2]
    q = p @ perspective[:, :2].T + perspective[:, 2]
    return (q[:, :2] / q[:, 2:]).astype(int)


# ----------------------------------------------------------------------------------------------------
# Backgrounds


def generate_background(rng: np.random.Generator, canvas: Canvas, nb_blobs: int = 100,
                        min_rad_ratio: float = 0.02, max_rad_ratio: float = 0.031,
                        min_kernel_size: int = 150, max_kernel_size: int = 500) -> None:
    """The reference's background, drawn on `canvas`: binary noise at a random threshold, `nb_blobs`
    discs of radius in [min_rad_ratio, max_rad_ratio) x max(H, W) with contrasting grey levels, then a
    box blur of min_kernel_size..max_kernel_size-1 canvas pixels. The noise is rescaled (same mean) so
    that after the blur it keeps the canvas-resolution variance.

    Everything here is blurred by >= min_kernel_size canvas pixels (19 output pixels by default), so
    `render` draws it on an output-size canvas and upsamples it."""
    h, w = canvas.size
    threshold = int(rng.integers(256))
    kernel = int(rng.integers(min_kernel_size, max_kernel_size))
    p_on = max(254 - threshold, 0) / 255  # cv2.randu(0, 255) is 0..254; THRESH_BINARY keeps > threshold
    gain = canvas.noise_gain(box_size=kernel)
    low = 255 * p_on * (1 - gain)
    levels = np.where(np.arange(256) < round(p_on * 256), low + 255 * gain, low)
    cv2.LUT(_uniform_bytes(rng, canvas.image.shape), np.rint(levels).astype(np.uint8), dst=canvas.image)
    background_color = canvas.mean()
    dim = max(h, w)
    centres = np.stack([rng.integers(0, w, nb_blobs), rng.integers(0, h, nb_blobs)], axis=1)
    radii = rng.integers(int(dim * min_rad_ratio), int(dim * max_rad_ratio), nb_blobs)
    colors = _random_color(rng, background_color, nb_blobs)
    rows, cols = canvas.image.shape
    last = _last_disc((0, 0, cols, rows), canvas.to_raster(centres), radii, canvas.scale, cols)
    np.copyto(canvas.image, np.append(colors, 0).astype(np.uint8)[last], where=last >= 0)
    canvas.image[:] = cv2.blur(canvas.image, canvas.box_kernel(kernel))


def _stamp_reach(sx: float, sy: float, max_radius: int) -> int:
    """How far (raster pixels, either axis) a disc of radius <= max_radius canvas pixels reaches from
    its centre's pixel."""
    return int(math.ceil(max_radius * max(sx, sy))) + 1


@lru_cache(maxsize=16)
def _disc_stamps(sx: float, sy: float, max_radius: int, row_stride: int):
    """Raster pixels covered by a disc, for every radius 0..max_radius (canvas pixels) and every centre
    phase on a 1/8-pixel grid: the pixel at (cell + dx, cell + dy) is covered when its centre lies in the
    disc (point sampling of the painting at the canvas resolution; cv2.circle(r=0) is one pixel).
    Returns (offsets, start, length): stamp k = (radius * 8 + phase_y) * 8 + phase_x covers the flat
    offsets offsets[start[k]:start[k] + length[k]] from its cell, in rows `row_stride` pixels long."""
    phase = np.arange(_PHASES) / _PHASES
    offsets, lengths = [], []
    for r in range(max_radius + 1):
        rho = max(r, 0.5)
        steps = np.arange(-_stamp_reach(sx, sy, r), _stamp_reach(sx, sy, r) + 1)
        dy, dx = [a.reshape(-1) for a in np.meshgrid(steps, steps, indexing="ij")]
        inside = (((dx - phase[None, :, None]) / (rho * sx)) ** 2
                  + ((dy - phase[:, None, None]) / (rho * sy)) ** 2) <= 1  # (phase_y, phase_x, pixel)
        stamp, pixel = np.nonzero(inside.reshape(_PHASES * _PHASES, -1))
        offsets.append((dy * row_stride + dx)[pixel])
        lengths.append(np.bincount(stamp, minlength=_PHASES * _PHASES))
    length = np.concatenate(lengths)
    return np.concatenate(offsets).astype(np.int32), np.cumsum(length) - length, length


def _last_disc(window, centres: np.ndarray, radii: np.ndarray, scale, raster_width: int) -> np.ndarray:
    """Which of several discs, painted in order, shows at each pixel of a window of a raster.

    window: (x0, y0, x1, y1) raster pixels; centres: (N, 2) raster x, y; radii: (N,) int canvas pixels;
    scale: the raster's (sx, sy); raster_width: its width (fixes the row stride, so that the stamps'
    offsets are computed once per raster size). Returns (y1 - y0, x1 - x0) int32: the index of the
    last disc covering each pixel centre, -1 for none. Vectorised: every disc contributes its stamp's
    pixels, and each pixel keeps the largest index.
    """
    x0, y0, x1, y1 = window
    sx, sy, max_radius = float(scale[0]), float(scale[1]), int(radii.max(initial=0))
    reach = _stamp_reach(sx, sy, max_radius)
    pad = 2 * reach  # discs centred up to `reach` outside the window still reach in
    stride = raster_width + 2 * pad
    offsets, start, length = _disc_stamps(sx, sy, max_radius, stride)
    q = np.round(centres * _PHASES).astype(np.int64)
    cell, phase = q // _PHASES, q % _PHASES
    index = np.flatnonzero(np.all((cell >= np.array([x0, y0]) - reach) & (cell < np.array([x1, y1]) + reach), axis=1))
    key = (radii[index] * _PHASES + phase[index, 1]) * _PHASES + phase[index, 0]
    n = length[key]
    ptr = np.arange(int(n.sum()), dtype=np.int32) + np.repeat((start[key] - (np.cumsum(n) - n)).astype(np.int32), n)
    origin = (cell[index, 1] - y0 + pad) * stride + cell[index, 0] + pad
    last = np.full((y1 - y0 + 2 * pad) * stride, -1, np.int32)
    np.maximum.at(last, np.repeat(origin.astype(np.int32), n) + offsets[ptr], np.repeat(index.astype(np.int32), n))
    return last.reshape(-1, stride)[pad:pad + y1 - y0, x0 + pad:x1 + pad]


def _fill_with_texture(rng: np.random.Generator, canvas: Canvas, corners: np.ndarray, background_color: int,
                       nb_blobs: int, kernel_boundaries) -> None:
    """Fill a polygon with the reference's custom background: a contrasting base grey, `nb_blobs`
    discs (radius 0..19) of contrasting greys anywhere on the canvas, box-blurred by a kernel in
    kernel_boundaries. Painted only over the polygon's bounding box plus the blur's reach, on the
    canvas's texture grid (`texture_step` raster pixels per texture pixel), then upsampled."""
    h, w = canvas.size
    base = int(_random_color(rng, background_color))
    kernel = int(rng.integers(kernel_boundaries[0], kernel_boundaries[1]))
    # Only the blobs that can reach the polygon through the blur matter: draw those, with the number
    # and positions that the reference's blobs, uniform over the image, have there. The margin (canvas
    # pixels, the same at every resolution so that the draws are too) also covers the rounding of the
    # blur and the upsampling for texture pixels of up to 8 canvas pixels.
    reach = kernel // 2 + _TEXTURE_MAX_RADIUS + 16
    x0, y0 = (max(int(v) - reach, 0) for v in corners.min(axis=0))
    x1, y1 = (min(int(v) + reach + 1, limit) for v, limit in zip(corners.max(axis=0), (w, h)))
    n = int(rng.binomial(nb_blobs, (x1 - x0) * (y1 - y0) / (w * h)))
    centres = np.stack([rng.integers(x0, x1, n), rng.integers(y0, y1, n)], axis=1)
    colors = _random_color(rng, background_color, n)
    radii = rng.integers(_TEXTURE_MAX_RADIUS + 1, size=n)
    step = canvas.texture_step
    scale = canvas.scale / step
    kx, ky = _box_kernel(kernel, scale)
    polygon = canvas.to_raster(corners)
    rh, rw = canvas.image.shape
    # Texture pixels under the polygon, plus the reach of the blur and of the upsampling.
    lo = np.floor((polygon.min(axis=0) + 0.5) / step - 0.5).astype(int) - (kx // 2 + 2, ky // 2 + 2)
    hi = np.ceil((polygon.max(axis=0) + 0.5) / step - 0.5).astype(int) + (kx // 2 + 3, ky // 2 + 3)
    (tx0, ty0), (tx1, ty1) = np.maximum(lo, 0), np.minimum(hi, (rw // step, rh // step))
    if tx1 <= tx0 or ty1 <= ty0:
        return
    last = _last_disc((tx0, ty0, tx1, ty1), (centres + 0.5) * scale - 0.5, radii, scale, rw // step)
    # Border reflection (cv2.blur's default) matters only where the region touches the image border,
    # where the reference's full-size blur reflects too.
    texture = cv2.blur(np.append(colors, base).astype(np.uint8)[last], (kx, ky))  # index -1 -> base
    x0, y0, x1, y1 = tx0 * step, ty0 * step, tx1 * step, ty1 * step
    if step > 1:
        texture = cv2.resize(texture, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    mask = np.zeros(texture.shape, np.uint8)
    cv2.fillPoly(mask, [_fixed(polygon - (x0, y0))], 1, cv2.LINE_8, _SHIFT)
    np.copyto(canvas.image[y0:y1, x0:x1], texture, where=mask.astype(bool))


# ----------------------------------------------------------------------------------------------------
# The nine primitives: each draws on a canvas that holds the background and returns its keypoints,
# (N, 2) int x, y in canvas pixels. `render` adds the background, blur, resize and point scaling.


def draw_lines(rng: np.random.Generator, canvas: Canvas, nb_lines: int = 10) -> np.ndarray:
    """1..nb_lines-1 attempted lines, random endpoints, a line crossing an earlier one skipped;
    thickness 1-2 % of min(H, W). Keypoints: the endpoints."""
    h, w = canvas.size
    min_dim = min(h, w)
    background_color = canvas.background_color
    segments = np.empty((0, 4), dtype=int)
    for _ in range(int(rng.integers(1, nb_lines))):
        segment = np.array([rng.integers(w), rng.integers(h), rng.integers(w), rng.integers(h)])
        if _crosses(segments, segment[None]):
            continue
        segments = np.concatenate([segments, segment[None]])
        color = _random_color(rng, background_color)
        thickness = int(rng.integers(int(min_dim * 0.01), int(min_dim * 0.02)))
        canvas.line(segment[:2], segment[2:], thickness, color)
    return segments.reshape(-1, 2)


def draw_polygon(rng: np.random.Generator, canvas: Canvas, max_sides: int = 8) -> np.ndarray:
    """One filled polygon of 3..max_sides-1 corners (redrawn until 3 survive the filtering).
    Keypoints: the corners."""
    while True:
        corners, _, _ = _random_polygons(rng, canvas.size, max_sides, 1)[0]
        if len(corners) >= 3:
            break
    canvas.fill_polygon(corners, _random_color(rng, canvas.background_color))
    return corners


def draw_multiple_polygons(rng: np.random.Generator, canvas: Canvas, max_sides: int = 8, nb_polygons: int = 30,
                           nb_blobs: int = 3000, kernel_boundaries=(50, 100)) -> np.ndarray:
    """Up to nb_polygons polygons, one skipped if an edge crosses an earlier polygon's or its circle
    nests with an earlier one's; each filled with its own blurred blob texture. Keypoints: the corners."""
    background_color = canvas.background_color
    kept = []  # (centre, radius, edges) of the polygons drawn; each lies in its circle
    for corners, centre, rad in _random_polygons(rng, canvas.size, max_sides, nb_polygons):
        if len(corners) < 3:
            continue
        edges = np.concatenate([corners, np.roll(corners, -1, axis=0)], axis=1)
        # Only polygons whose circles meet this one's can nest with it or cross it.
        near = [(math.hypot(centre[0] - c[0], centre[1] - c[1]), r, e) for c, r, e in kept]
        near = [(d, r, e) for d, r, e in near if d <= rad + r]
        if any(d + min(rad, r) < max(rad, r) for d, r, _ in near):
            continue
        if near and _crosses(np.concatenate([e for _, _, e in near]), edges):
            continue
        kept.append((centre, rad, edges))
        _fill_with_texture(rng, canvas, corners, background_color, nb_blobs, kernel_boundaries)
    return np.concatenate([e[:, :2] for _, _, e in kept]) if kept else np.empty((0, 2), dtype=int)


def draw_ellipses(rng: np.random.Generator, canvas: Canvas, nb_ellipses: int = 20) -> np.ndarray:
    """Up to nb_ellipses filled ellipses (semi-axes 1/20..1/4 of min(H, W), not overlapping, rotated
    0..90 degrees). No keypoints."""
    h, w = canvas.size
    min_dim = min(h, w) / 4
    background_color = canvas.background_color
    centres = np.empty((0, 2))
    rads = np.empty(0)
    for _ in range(nb_ellipses):
        ax = int(max(rng.random() * min_dim, min_dim / 5))
        ay = int(max(rng.random() * min_dim, min_dim / 5))
        max_rad = max(ax, ay)
        centre = np.array([rng.integers(max_rad, w - max_rad), rng.integers(max_rad, h - max_rad)])
        if np.any(max_rad > np.linalg.norm(centres - centre, axis=1) - rads):
            continue
        centres = np.concatenate([centres, centre[None]])
        rads = np.append(rads, max_rad)
        color = _random_color(rng, background_color)
        canvas.ellipse(centre, (ax, ay), rng.random() * 90, color)
    return np.empty((0, 2), dtype=int)


def draw_star(rng: np.random.Generator, canvas: Canvas, nb_branches: int = 6) -> np.ndarray:
    """3..nb_branches-1 lines from a centre to tips in the angular slices of a circle.
    Keypoints: the centre and the tips."""
    h, w = canvas.size
    n = int(rng.integers(3, nb_branches))
    min_dim = min(h, w)
    thickness = int(rng.integers(int(min_dim * 0.01), int(min_dim * 0.02)))
    rad = max(rng.random() * min_dim / 2, min_dim / 5)
    centre = np.array([rng.integers(int(rad), int(w - rad)), rng.integers(int(rad), int(h - rad))])
    slices = np.linspace(0, 2 * math.pi, n + 1)
    angles = slices[:-1] + rng.random(n) * (slices[1:] - slices[:-1])
    radial = np.maximum(rng.random((n, 2)), 0.3)
    tips = (centre + radial * rad * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(int)
    background_color = canvas.background_color
    for tip in tips:
        canvas.line(centre, tip, thickness, _random_color(rng, background_color))
    return np.concatenate([centre[None], tips])


def draw_checkerboard(rng: np.random.Generator, canvas: Canvas, max_rows: int = 7, max_cols: int = 7,
                      transform_params=(0.05, 0.15)) -> np.ndarray:
    """A 3..max_rows-1 x 3..max_cols-1 board under a random affinity and homography, neighbouring cells
    in contrasting greys, plus random lines along grid rows and columns. Keypoints: the grid corners
    inside the image."""
    h, w = canvas.size
    min_dim = min(h, w)
    background_color = canvas.background_color
    rows, cols = int(rng.integers(3, max_rows)), int(rng.integers(3, max_cols))
    cell = min((w - 1) // cols, (h - 1) // rows)
    gx, gy = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1))
    grid = _warp_board(rng, canvas.size, cell * np.stack([gx.ravel(), gy.ravel()], axis=1), transform_params)

    def corner(i, j):
        return grid[i * (cols + 1) + j]

    colors = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            if i == 0 and j == 0:
                color = int(_random_color(rng, background_color))
            else:
                neighbours = ([colors[i - 1][j]] if i else []) + ([colors[i][j - 1]] if j else [])
                color = _different_color(rng, neighbours)
            colors[i][j] = color
            canvas.fill_polygon([corner(i, j), corner(i, j + 1), corner(i + 1, j + 1), corner(i + 1, j)], color)
    nb_rows, nb_cols = int(rng.integers(2, rows + 2)), int(rng.integers(2, cols + 2))
    thickness = int(rng.integers(int(min_dim * 0.01), int(min_dim * 0.015)))
    for _ in range(nb_rows):
        i, j1, j2 = int(rng.integers(rows + 1)), int(rng.integers(cols + 1)), int(rng.integers(cols + 1))
        canvas.line(corner(i, j1), corner(i, j2), thickness, _random_color(rng, background_color))
    for _ in range(nb_cols):
        j, i1, i2 = int(rng.integers(cols + 1)), int(rng.integers(rows + 1)), int(rng.integers(rows + 1))
        canvas.line(corner(i1, j), corner(i2, j), thickness, _random_color(rng, background_color))
    return _inside(grid, canvas.size)


def draw_stripes(rng: np.random.Generator, canvas: Canvas, max_nb_cols: int = 13, min_width_ratio: float = 0.04,
                 transform_params=(0.05, 0.15)) -> np.ndarray:
    """Vertical stripes (5..max_nb_cols-1 attempted, at least min_width_ratio x min(H, W) wide) on a
    board 1-2x the image, under a random affinity and homography, alternating greys, plus random lines
    along the stripes' ends and borders. Keypoints: the stripes' corners inside the image."""
    h, w = canvas.size
    min_dim = min(h, w)
    background_color = canvas.background_color
    board_h, board_w = int(h * (1 + rng.random())), int(w * (1 + rng.random()))
    n = int(rng.integers(5, max_nb_cols))
    cols = np.unique(np.concatenate([board_w * rng.random(n - 1), [0, board_w - 1]]).astype(int))
    min_width = min_dim * min_width_ratio
    cols = cols[np.diff(cols, append=board_w + min_width) >= min_width]
    n = len(cols) - 1
    board = np.concatenate([np.stack([cols, np.zeros_like(cols)], axis=1),
                            np.stack([cols, np.full_like(cols, board_h - 1)], axis=1)])
    points = _warp_board(rng, canvas.size, board, transform_params)
    color = int(_random_color(rng, background_color))
    for i in range(n):
        color = (color + 128 + int(rng.integers(-30, 30))) % 256
        canvas.fill_polygon(points[[i, i + 1, i + n + 2, i + n + 1]], color)
    nb_rows, nb_cols = int(rng.integers(2, 5)), int(rng.integers(2, n + 2))
    thickness = int(rng.integers(int(min_dim * 0.01), int(min_dim * 0.015)))
    for _ in range(nb_rows):
        row = int(rng.choice([0, n + 1]))
        j1, j2 = int(rng.integers(n + 1)), int(rng.integers(n + 1))
        canvas.line(points[row + j1], points[row + j2], thickness, _random_color(rng, background_color))
    for _ in range(nb_cols):
        j = int(rng.integers(n + 1))
        canvas.line(points[j], points[j + n + 1], thickness, _random_color(rng, background_color))
    return _inside(points, canvas.size)


def draw_cube(rng: np.random.Generator, canvas: Canvas, min_size_ratio: float = 0.2, scale_interval=(0.4, 0.6),
              trans_interval=(0.5, 0.2)) -> np.ndarray:
    """A box (sides min_size_ratio..min_size_ratio + 2/3 of min(H, W)) rotated about three axes by
    18..72 degrees, scaled and translated, projected orthographically: three faces filled in one grey,
    edges in contrasting greys. Keypoints: the 7 visible vertices inside the image."""
    h, w = canvas.size
    min_dim = min(h, w)
    background_color = canvas.background_color
    lx, ly, lz = min_dim * min_size_ratio + rng.random(3) * 2 * min_dim / 3
    cube = np.array([[0, 0, 0], [lx, 0, 0], [0, ly, 0], [lx, ly, 0],
                     [0, 0, lz], [lx, 0, lz], [0, ly, lz], [lx, ly, lz]])
    a, b, c = rng.random(3) * 3 * math.pi / 10 + math.pi / 10
    rot_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rot_y = np.array([[math.cos(c), 0, -math.sin(c)], [0, 1, 0], [math.sin(c), 0, math.cos(c)]])
    scaling = np.diag(scale_interval[0] + rng.random(3) * scale_interval[1])
    trans = np.array([w * trans_interval[0] + rng.integers(int(-w * trans_interval[1]), int(w * trans_interval[1])),
                      h * trans_interval[0] + rng.integers(int(-h * trans_interval[1]), int(h * trans_interval[1])),
                      0])
    cube = (trans + cube @ (scaling @ rot_z @ rot_x @ rot_y).T)[:, :2].astype(int)
    # Vertex 0 is hidden and 7 in front by construction; adjacent vertices differ by one bit.
    faces = np.array([[7, 3, 1, 5], [7, 5, 4, 6], [7, 6, 2, 3]])
    face_color = int(_random_color(rng, background_color))
    for face in faces:
        canvas.fill_polygon(cube[face], face_color)
    thickness = int(rng.integers(int(min_dim * 0.003), int(min_dim * 0.015)))
    for face in faces:
        for j in range(4):
            edge_color = (face_color + 128 + int(rng.integers(-64, 64))) % 256
            canvas.line(cube[face[j]], cube[face[(j + 1) % 4]], thickness, edge_color)
    return _inside(cube[1:], canvas.size)


def gaussian_noise(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    """Uniform noise over the whole image (the reference's cv2.randu(img, 0, 255)), scaled about its
    mean so that after the final blur and resize it has the canvas-resolution standard deviation.
    No keypoints. The noise is uniform, not Gaussian: the name is the reference's, kept because configs
    name primitives by it (`primitives`, `truncate`, `generation.params`) and caches store it."""
    levels = 127 + (np.arange(256) - 127.5) * canvas.noise_gain()
    cv2.LUT(_uniform_bytes(rng, canvas.image.shape), np.rint(levels).astype(np.uint8), dst=canvas.image)
    return np.empty((0, 2), dtype=int)


_DRAW = {name: globals()[name] for name in PRIMITIVES}


# ----------------------------------------------------------------------------------------------------
# Settings, checked once


def _frozen(value):
    """Nested dicts and lists -> nested tuples ((key, value) pairs for dicts): read-only and picklable."""
    if isinstance(value, Mapping):
        return tuple((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class ShapesSettings:
    """The checked generation settings (`shapes_settings`): what rendering, sample order and the cache
    read. Immutable, so it is passed as is to worker processes and never re-checked."""

    primitives: tuple  # names among PRIMITIVES, in PRIMITIVES order
    truncate: tuple  # ((primitive, fraction of its samples kept), ...)
    split_sizes: tuple  # ((split, samples per primitive), ...)
    image_size: tuple  # (H, W) canvas pixels
    resize: tuple  # (H, W) of the returned images
    blur_size: int
    random_seed: int
    oversampling: Optional[int]  # None: draw at image_size
    params: tuple  # ((primitive or 'generate_background', ((keyword, value), ...)), ...)
    suffix: Optional[str]

    def kwargs(self, name: str) -> dict:
        """Keyword arguments of a primitive (or of generate_background)."""
        return dict(dict(self.params)[name])

    def split_count(self, primitive: str, split: str) -> int:
        """Samples of `primitive` in `split`: int(truncate * split size), as the reference."""
        return int(dict(self.truncate).get(primitive, 1) * dict(self.split_sizes)[split])

    def as_dict(self) -> dict:
        """The generation parameters as plain nested dicts (JSON-ready)."""
        return {"primitives": list(self.primitives), "truncate": dict(self.truncate),
                "split_sizes": dict(self.split_sizes), "image_size": list(self.image_size),
                "resize": list(self.resize), "blur_size": self.blur_size, "random_seed": self.random_seed,
                "oversampling": self.oversampling, "suffix": self.suffix,
                "params": {name: dict(kw) for name, kw in self.params}}


def shapes_settings(conf: Optional[Mapping] = None, source: str = "config") -> ShapesSettings:
    """Check the keys of `generation_defaults` in a dataset's `data` section (other keys are left to the
    dataset) and return them as a ShapesSettings; a bad value is a ConfigError naming `data.<key>`.
    A ShapesSettings is returned as it is."""
    if isinstance(conf, ShapesSettings):
        return conf
    conf = conf or {}
    s = merge(generation_defaults, {k: conf[k] for k in generation_defaults if k in conf}, source, "data.")
    gen, pre = s["generation"], s["preprocessing"]
    names = s["primitives"]
    names = list(PRIMITIVES) if names == "all" else ([names] if isinstance(names, str) else list(names or []))
    if not names or any(p not in PRIMITIVES for p in names):
        raise ConfigError(f"{source}: 'data.primitives' is {s['primitives']!r}; expected 'all' or names among "
                          f"{list(PRIMITIVES)}, e.g. [draw_lines, draw_star]")
    truncate = s["truncate"] or {}
    for p, frac in truncate.items():
        if p not in PRIMITIVES:
            raise ConfigError(f"{source}: 'data.truncate.{p}': unknown primitive; expected one of {list(PRIMITIVES)}")
        truncate[p] = check_number(frac, f"data.truncate.{p}", source, 0, 1, example=0.5)
    for split, size in gen["split_sizes"].items():
        if split not in SPLITS:
            raise ConfigError(f"{source}: 'data.generation.split_sizes.{split}': unknown split; expected one of "
                              f"{list(SPLITS)}")
        gen["split_sizes"][split] = check_int(size, f"data.generation.split_sizes.{split}", source, minimum=0)
    image_size = _size(gen["image_size"], "data.generation.image_size", source)
    resize = _size(pre["resize"], "data.preprocessing.resize", source)
    blur = check_int(pre["blur_size"], "data.preprocessing.blur_size", source, minimum=1, example=21)
    if blur % 2 == 0:
        raise ConfigError(f"{source}: 'data.preprocessing.blur_size' is {blur!r}; expected an odd positive "
                          f"integer, e.g. 21")
    over = gen["oversampling"]
    return ShapesSettings(
        primitives=tuple(p for p in PRIMITIVES if p in names), truncate=_frozen(truncate),
        split_sizes=_frozen(gen["split_sizes"]), image_size=image_size, resize=resize, blur_size=blur,
        random_seed=check_int(gen["random_seed"], "data.generation.random_seed", source),
        oversampling=None if over is None else check_int(over, "data.generation.oversampling", source, minimum=1),
        params=_frozen(gen["params"]), suffix=s["suffix"])


def _size(value, key: str, source: str) -> tuple:
    size = tuple(check_list(value, key, source, item=partial(check_int, minimum=1), example="[240, 320]"))
    if len(size) != 2:
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected [height, width], e.g. [240, 320]")
    return size


# ----------------------------------------------------------------------------------------------------
# One sample


def render(primitive: str, rng: np.random.Generator, settings=None):
    """One sample of `primitive`: background, shapes, blur, resize.

    settings: a ShapesSettings, or a dataset's data section (checked by `shapes_settings`; None: defaults).
    Returns (image uint8 (h, w) with (h, w) = preprocessing.resize, keypoints float32 (N, 2) x, y in
    pixels of that image; they may lie up to half a pixel outside it).
    """
    s = shapes_settings(settings)
    if primitive not in PRIMITIVES:
        raise ValueError(f"unknown primitive {primitive!r}; expected one of {list(PRIMITIVES)}")
    size, out, over = s.image_size, s.resize, s.oversampling
    raster = size if over is None else tuple(over * v for v in out)
    # Textures are box-blurred by >= 50 canvas pixels (6 output pixels): painted at twice the output size.
    canvas = Canvas(size, raster, s.blur_size, texture_step=over // 2 if over is not None and over % 2 == 0 else 1)
    if primitive != "gaussian_noise":
        # Heavily blurred (see generate_background): drawn at the output size, then upsampled. Also
        # when drawing at image_size, so that both give the primitives the same background_color.
        background = Canvas(size, out, s.blur_size)
        generate_background(rng, background, **s.kwargs("generate_background"))
        canvas.image[:] = cv2.resize(background.image, raster[::-1], interpolation=cv2.INTER_LINEAR)
        canvas.background_color = background.mean()
    points = _DRAW[primitive](rng, canvas, **s.kwargs(primitive))
    image = canvas.finish(out)
    scale = (out[1] / size[1], out[0] / size[0])
    return image, resize_points(points.astype(np.float64), scale).astype(np.float32)


def render_sample(settings, primitive: str, split: str, index: int, seed: int | None = None):
    """Sample `index` of `primitive` in `split`, drawn from its own generator
    default_rng([seed, primitive, split, index]) (seed: generation.random_seed unless given), so any
    process renders it identically: the on-the-fly mode, and what the cache stores.
    settings: a ShapesSettings or a data section (see `render`)."""
    s = shapes_settings(settings)
    seed = s.random_seed if seed is None else seed
    rng = np.random.default_rng([int(seed), PRIMITIVES.index(primitive), SPLITS.index(split), int(index)])
    return render(primitive, rng, s)


def split_samples(settings, split: str) -> list:
    """[(primitive, index), ...]: the split in dataset order (reference: truncate each primitive, then
    concatenate and shuffle with a seeded permutation). settings: as `render`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    s = shapes_settings(settings)
    samples = [(p, i) for p in s.primitives for i in range(s.split_count(p, split))]
    order = np.random.default_rng(s.random_seed).permutation(len(samples))
    return [samples[k] for k in order]
