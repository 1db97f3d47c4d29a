"""Homographies: sampling, point and image warps, valid masks, pixel <-> normalised coordinates.

The one coordinate convention of the project
-------------------------------------------
* A point is (x, y) in pixels: x is the column, y the row. The centre of the pixel at (row r, column c)
  is the point (c, r); an H x W image covers [-0.5, W - 0.5] x [-0.5, H - 0.5].
* Normalised coordinates put the centres of the corner pixels at -1 and +1:
  xn = 2 x / (W - 1) - 1 (this is `grid_sample(..., align_corners=True)`).
* A homography H (3, 3) acts on column vectors [x, y, 1]^T and maps *source* points to *destination*
  points. `warp_image(img, H)` renders the destination: out(p) = img(H^-1 p).
* Sampled homographies (`sample_homography`) are normalised and map the original image to the warped
  one, like the reference's `Hn = inv(sample_homography_np(...))`; `denormalize_homography` turns
  them into pixel homographies for a given image size.

The reference mixed two normalisations (x/W for labels, x/(W-1) for images); here every caller goes
through these functions, so labels, images and masks always agree.
"""
from __future__ import annotations

import math
from typing import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Parameters of `sample_homography`, with the defaults of the reference's sample_homography_np.
HOMOGRAPHY_DEFAULTS = {
    "translation": True,
    "rotation": True,
    "scaling": True,
    "perspective": True,
    "scaling_amplitude": 0.1,
    "perspective_amplitude_x": 0.1,
    "perspective_amplitude_y": 0.1,
    "patch_ratio": 0.5,
    "max_angle": math.pi / 2,
    "allow_artifacts": False,
    "translation_overflow": 0.0,
    "n_scales": 5,
    "n_angles": 25,
}


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, size=None) -> np.ndarray:
    """Normal samples truncated at two standard deviations (as scipy's truncnorm(-2, 2))."""
    z = rng.standard_normal(size)
    z = np.atleast_1d(z)
    bad = np.abs(z) > 2
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    out = mean + std * z
    return out if size is not None else out[0]


def sample_homography(rng: np.random.Generator, params: Mapping | None = None) -> np.ndarray:
    """One random homography in normalised coordinates, mapping the original to the warped image.

    The algorithm of the reference (and of the TensorFlow SuperPoint): a centred patch of relative size
    `patch_ratio` whose corners are perturbed, scaled, translated and rotated; the warped image shows
    that patch. params: keys of HOMOGRAPHY_DEFAULTS (unknown keys are an error).
    Returns (3, 3) float64.
    """
    p = dict(HOMOGRAPHY_DEFAULTS)
    for key, value in (params or {}).items():
        if key not in p:
            raise KeyError(f"unknown homography parameter '{key}'; expected one of {sorted(p)}")
        p[key] = value
    pr = float(p["patch_ratio"])
    margin = (1 - pr) / 2
    out_corners = np.array([[0, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float64)
    patch = margin + np.array([[0, 0], [0, pr], [pr, pr], [pr, 0]], dtype=np.float64)

    def inside(pts):  # (K, 4, 2) -> (K,)
        return np.all((pts >= 0) & (pts < 1), axis=(1, 2))

    if p["perspective"]:
        amp_x, amp_y = float(p["perspective_amplitude_x"]), float(p["perspective_amplitude_y"])
        if not p["allow_artifacts"]:
            amp_x, amp_y = min(amp_x, margin), min(amp_y, margin)
        dy = _truncated_normal(rng, 0.0, amp_y / 2)
        dxl = _truncated_normal(rng, 0.0, amp_x / 2)
        dxr = _truncated_normal(rng, 0.0, amp_x / 2)
        patch = patch + np.array([[dxl, dy], [dxl, -dy], [dxr, dy], [dxr, -dy]])

    if p["scaling"]:
        n = int(p["n_scales"])
        scales = np.concatenate([[1.0], _truncated_normal(rng, 1.0, p["scaling_amplitude"] / 2, n)])
        center = patch.mean(axis=0, keepdims=True)
        scaled = (patch - center)[None] * scales[:, None, None] + center
        # With artifacts allowed the reference (and TF) pick among indices 0..n-1: scale 1 included,
        # the last sampled scale never chosen. Kept for the same distribution.
        valid = np.arange(n) if p["allow_artifacts"] else np.flatnonzero(inside(scaled))
        patch = scaled[rng.choice(valid)] if len(valid) else patch

    if p["translation"]:
        t_min, t_max = patch.min(axis=0), (1 - patch).min(axis=0)
        if p["allow_artifacts"]:
            t_min = t_min + p["translation_overflow"]
            t_max = t_max + p["translation_overflow"]
        # low + (high - low) U: Generator.uniform's own formula (same values), which also accepts
        # low > high (a patch wider than the image, possible with artifacts) like the reference's
        # np.random.uniform, where Generator.uniform raises.
        low, high = -t_min, t_max
        patch = patch + low + (high - low) * rng.random(2)

    if p["rotation"]:
        n = int(p["n_angles"])
        angles = np.concatenate([np.linspace(-p["max_angle"], p["max_angle"], n), [0.0]])
        center = patch.mean(axis=0, keepdims=True)
        c, s = np.cos(angles), np.sin(angles)
        rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (n+1, 2, 2)
        rotated = np.matmul((patch - center)[None], rot) + center
        valid = np.arange(n) if p["allow_artifacts"] else np.flatnonzero(inside(rotated))
        patch = rotated[rng.choice(valid)] if len(valid) else patch

    # Unit square -> [-1, 1]; the transform maps warped-image corners to original-image points.
    out_corners = out_corners * 2 - 1
    patch = patch * 2 - 1
    warped_to_original = cv2.getPerspectiveTransform(out_corners.astype(np.float32), patch.astype(np.float32))
    return np.linalg.inv(warped_to_original.astype(np.float64))


def sample_homographies(n: int, rng: np.random.Generator, params: Mapping | None = None,
                        identity_first: bool = False) -> np.ndarray:
    """`n` homographies from `sample_homography`, (n, 3, 3) float64; optionally the first is identity."""
    hs = np.stack([sample_homography(rng, params) for _ in range(n)]) if n else np.zeros((0, 3, 3))
    if identity_first and n:
        hs[0] = np.eye(3)
    return hs


def normalization_matrix(height: int, width: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(3, 3) matrix T mapping pixel coordinates to normalised ones: xn = 2x/(W-1) - 1."""
    return torch.tensor(
        [[2.0 / (width - 1), 0.0, -1.0], [0.0, 2.0 / (height - 1), -1.0], [0.0, 0.0, 1.0]],
        dtype=dtype, device=device,
    )


def denormalize_homography(h_norm, height: int, width: int):
    """Normalised homography (..., 3, 3) -> pixel homography T^-1 H T for an H x W image.

    Accepts numpy arrays or tensors and returns the same kind.
    """
    is_numpy = isinstance(h_norm, np.ndarray)
    h = torch.as_tensor(h_norm)
    t = normalization_matrix(height, width, dtype=h.dtype if h.is_floating_point() else torch.float64,
                             device=h.device)
    out = torch.linalg.inv(t) @ h @ t
    return out.numpy() if is_numpy else out


def normalize_homography(h_pixel, height: int, width: int):
    """Pixel homography (..., 3, 3) -> normalised T H T^-1 (inverse of `denormalize_homography`)."""
    is_numpy = isinstance(h_pixel, np.ndarray)
    h = torch.as_tensor(h_pixel)
    t = normalization_matrix(height, width, dtype=h.dtype if h.is_floating_point() else torch.float64,
                             device=h.device)
    out = t @ h @ torch.linalg.inv(t)
    return out.numpy() if is_numpy else out


def scale_homography(h_pixel, scale_src, scale_dst):
    """Pixel homography between images resized by per-axis factors.

    h_pixel maps source to destination pixels of the original images; the source was resized by
    scale_src = (sx, sy) and the destination by scale_dst. Returns S_dst H S_src^-1 (numpy, (3, 3)).
    Resizing maps a pixel centre x to (x + 0.5) s - 0.5 in this convention.
    """
    def resize_matrix(s):
        sx, sy = s
        return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])

    return resize_matrix(scale_dst) @ np.asarray(h_pixel, dtype=np.float64) @ np.linalg.inv(resize_matrix(scale_src))


def resize_points(points, scale):
    """Points (..., 2) x, y of an image resized by per-axis factors scale = (sx, sy): a pixel centre x
    maps to (x + 0.5) sx - 0.5 (the convention of this module). numpy or torch in, same type out."""
    sx, sy = scale
    if isinstance(points, torch.Tensor):
        s = torch.tensor([sx, sy], dtype=points.dtype, device=points.device)
    else:
        points = np.asarray(points)
        s = np.array([sx, sy], dtype=points.dtype if points.dtype.kind == "f" else np.float64)
    return (points + 0.5) * s - 0.5


def warp_points(points: torch.Tensor, homography: torch.Tensor) -> torch.Tensor:
    """Apply a homography to points.

    points: (..., N, 2) x, y. homography: (..., 3, 3), broadcast against the points' leading dims.
    Returns (..., N, 2) in the points' dtype. Points mapped to infinity come back as inf/nan.
    """
    h = homography.to(points.dtype)
    xyz = points @ h[..., :2, :2].transpose(-1, -2) + h[..., None, :2, 2]
    z = points @ h[..., 2:3, :2].transpose(-1, -2) + h[..., None, 2:3, 2]
    return xyz / z


def warp_points_np(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """numpy twin of `warp_points` for the evaluation code: (N, 2) and (3, 3) -> (N, 2) float64."""
    out = warp_points(torch.from_numpy(np.asarray(points, dtype=np.float64).reshape(-1, 2)),
                      torch.from_numpy(np.asarray(homography, dtype=np.float64)))
    return out.numpy()


def inside_image(points: torch.Tensor, height: int, width: int, border: float = 0) -> torch.Tensor:
    """Mask (..., N) of points that fall on a pixel of an H x W image at least `border` pixels from
    its edge, i.e. round(x) in [border, W - 1 - border] (and the same for y)."""
    x, y = points[..., 0], points[..., 1]
    return (x >= border - 0.5) & (x < width - 0.5 - border) & (y >= border - 0.5) & (y < height - 0.5 - border)


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) pixel-centre coordinates, x then y."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _as_batch(homography: torch.Tensor, batch: int) -> torch.Tensor:
    h = homography if homography.dim() == 3 else homography[None]
    return h.expand(batch, 3, 3) if h.shape[0] == 1 and batch > 1 else h


def _projected_pixel_grid(matrix: torch.Tensor, out_shape) -> torch.Tensor:
    """(B, H_out, W_out, 2) float32: the projective map `matrix` (B, 3, 3) applied to every pixel centre.

    Each row of M [x, y, 1]^T is a column term plus a row term, summed by broadcasting over planes
    (B, 3, H, W); x and y are returned as a strided view of their planes, which `grid_sample` reads as
    fast as a contiguous grid. On the CPU this is 5x faster than a (HW, 2) x (2, 2) matrix product and
    a stack (the label export maps two grids per view).
    """
    m = matrix.float()[:, :, :, None, None]  # (B, 3 rows, 3 coefficients, 1, 1)
    h_out, w_out = out_shape
    xs = torch.arange(w_out, device=m.device, dtype=torch.float32)[None, None, None, :]
    ys = torch.arange(h_out, device=m.device, dtype=torch.float32)[None, None, :, None]
    rows = torch.addcmul(m[:, :, 1] * ys + m[:, :, 2], m[:, :, 0], xs)  # (B, 3, H_out, W_out)
    return rows[:, :2].mul_(rows[:, 2:].reciprocal_()).permute(0, 2, 3, 1)


def sampling_grid(homography: torch.Tensor, src_shape, out_shape=None, device=None) -> torch.Tensor:
    """The `grid_sample` grid (align_corners=True) that renders a source image through `homography`:
    the preimages H^-1 p of the destination pixel centres in the source's normalised coordinates, with
    points at infinity (NaN, inf) sent outside (-2).

    homography: (B, 3, 3) or (3, 3), pixel, source -> destination. src_shape: (H, W) of the source.
    out_shape: (H_out, W_out), default src_shape. Returns (B, H_out, W_out, 2) float32. The pixel ->
    normalised scaling is folded into H^-1 (float64), so each pixel costs one projective map.
    """
    hom = homography if homography.dim() == 3 else homography[None]
    hom = hom.to(device=device, dtype=torch.float64)
    to_normalised = normalization_matrix(*src_shape, device=hom.device)
    grid = _projected_pixel_grid(to_normalised @ torch.linalg.inv(hom), out_shape or src_shape)
    return torch.nan_to_num_(grid, nan=-2.0, posinf=-2.0, neginf=-2.0)


def inside_grid(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`inside_image` for points in normalised coordinates (e.g. a `sampling_grid` of an H x W source):
    round(x) in [0, W - 1] is xn in [-1 - 1/(W-1), 1 + 1/(W-1)). grid: (..., 2). Returns (...) bool."""
    xn, yn = grid[..., 0], grid[..., 1]
    bx, by = 1.0 + 1.0 / (width - 1), 1.0 + 1.0 / (height - 1)
    return (xn >= -bx) & (xn < bx) & (yn >= -by) & (yn < by)


def warp_image(image: torch.Tensor, homography: torch.Tensor, out_shape=None, mode: str = "bilinear",
               padding_mode: str = "zeros") -> torch.Tensor:
    """Render `image` seen through `homography`: out(p) = image(H^-1 p).

    image: (B, C, H, W). homography: (B, 3, 3) or (3, 3), pixel coordinates, source -> destination.
    out_shape: (H_out, W_out), default the input size. Pixels whose source falls outside the image get
    zeros (padding_mode 'zeros'). Returns (B, C, H_out, W_out) in the image's dtype.
    """
    b, _, h, w = image.shape
    return sample_with_grid(image, sampling_grid(_as_batch(homography, b), (h, w), out_shape, device=image.device),
                            mode, padding_mode)


def sample_with_grid(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                     padding_mode: str = "zeros") -> torch.Tensor:
    """`image` (B, C, H, W) read at a (B, H_out, W_out, 2) `sampling_grid`; (B, C, H_out, W_out)."""
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def disc_kernel(radius: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2r+1, 2r+1) disc of ones: the structuring element of mask erosion."""
    r = int(radius)
    y, x = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    return ((x * x + y * y) <= r * r + 1e-9).to(device=device, dtype=dtype)


def erode_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of (B, 1, H, W) masks by a disc of `radius` pixels (`disc_kernel`).

    Outside the image counts as valid (like OpenCV's default erosion border), so only the boundary of
    the warped region is eroded, not the image edge. Returns a float mask of 0/1. On the CPU OpenCV's
    erosion does it (25x faster than a convolution there: the label export erodes one mask per view);
    elsewhere a convolution counts the invalid pixels under the disc.
    """
    if radius <= 0:
        return mask.float()
    if mask.device.type != "cpu":
        return _erode_by_convolution(mask, radius)
    kernel = disc_kernel(radius).numpy().astype(np.uint8)
    binary = (mask > 0.5).to(torch.uint8).numpy()
    eroded = np.stack([cv2.erode(m[0], kernel)[None] for m in binary]) if len(binary) else binary
    return torch.from_numpy(eroded).float()


def _erode_by_convolution(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """`erode_mask` on any device: a pixel stays valid when no invalid pixel lies under the disc."""
    kernel = disc_kernel(radius, device=mask.device)[None, None]
    invalid = F.pad(1.0 - mask.float(), [radius] * 4, value=0.0)
    hits = F.conv2d(invalid, kernel)
    return (hits < 0.5).float()


def valid_mask(src_shape, homography: torch.Tensor, out_shape=None, erosion_radius: int = 0) -> torch.Tensor:
    """Mask of the destination pixels that see the source image through `homography`.

    src_shape: (H, W) of the source. homography: (B, 3, 3) or (3, 3), pixel, source -> destination.
    A destination pixel is valid when its preimage falls on a source pixel (`inside_grid` of the
    `sampling_grid` that `warp_image` samples), then the mask is eroded by `erosion_radius`.
    Returns (B, 1, H_out, W_out) float 0/1.
    """
    return grid_valid_mask(sampling_grid(homography, src_shape, out_shape, device=homography.device), src_shape,
                           erosion_radius)


def grid_valid_mask(grid: torch.Tensor, src_shape, erosion_radius: int = 0) -> torch.Tensor:
    """`valid_mask` of a `sampling_grid` (B, H_out, W_out, 2) already built for an (H, W) source, e.g. the
    one a warp samples with. Returns (B, 1, H_out, W_out) float 0/1."""
    return erode_mask(inside_grid(grid, *src_shape)[:, None], erosion_radius)
