"""Synthetic shapes generation speed (CPU), in one run:

  per primitive   ms per image of `render_sample` in this process (OpenCV on one thread), as generated
                  (default oversampling 4) and reference-style (drawn at 960x1280, `oversampling: null`;
                  for draw_multiple_polygons also with the reference's texture: one cv2.circle call per
                  blob over the whole image, a full-size blur and mask per polygon)
  generation      images/s of `ensure_cache` (PNG and points files included) with 1 and 2 processes on
                  a set mixed like the default one (the default truncate), and the projected time of the
                  default set (66,000 training + 1,320 validation images), also from the CPU time
                  (this process and its workers), i.e. on 2 cores nobody else uses

Medians of --runs runs, and the best run (the least disturbed by other loads on a shared machine).
Configuration: the shipped magicpoint_shapes_pair values (120x160, blur 21).
    python benchmarks/synthetic_shapes.py [--runs 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402  (puts the repository on sys.path)

from datasets import synthetic_shapes as ss  # noqa: E402
from datasets import synthetic_shapes_cache as cache_lib  # noqa: E402

CONF = {"preprocessing": {"resize": [120, 160], "blur_size": 21},
        "truncate": {"draw_ellipses": 0.3, "draw_stripes": 0.2, "gaussian_noise": 0.1}}
REFERENCE_CONF = {**CONF, "generation": {"oversampling": None}}
DEFAULT_SET = 66000 + 1320


def reference_style_texture(rng, canvas, corners, background_color, nb_blobs, kernel_boundaries):
    """The reference's polygon texture, for comparison only: same random draws as
    `_fill_with_texture`, drawn as the reference does at full resolution (canvas scale 1)."""
    h, w = canvas.size
    base = int(ss._random_color(rng, background_color))
    centres = np.stack([rng.integers(0, w, nb_blobs), rng.integers(0, h, nb_blobs)], axis=1)
    colors = ss._random_color(rng, background_color, nb_blobs)
    radii = rng.integers(ss._TEXTURE_MAX_RADIUS + 1, size=nb_blobs)
    kernel = int(rng.integers(kernel_boundaries[0], kernel_boundaries[1]))
    texture = np.full(canvas.image.shape, base, np.uint8)
    for (x, y), r, c in zip(centres.tolist(), radii.tolist(), colors.tolist()):
        cv2.circle(texture, (x, y), r, c, -1)
    texture = cv2.blur(texture, (kernel, kernel))
    mask = np.zeros(canvas.image.shape, np.uint8)
    cv2.fillPoly(mask, [corners.reshape(-1, 1, 2).astype(np.int32)], 255)
    locs = np.where(mask != 0)
    canvas.image[locs] = texture[locs]


def ms_per_image(conf, primitive: str, images: int, runs: int) -> tuple:
    """(median wall, best wall, median CPU) ms per image of render_sample over runs."""
    conf = ss.shapes_settings(conf)  # checked once, as the dataset does
    ss.render_sample(conf, primitive, "test", 10 ** 6)  # warm-up (stamp tables)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(images):
            ss.render_sample(conf, primitive, "test", i)
        wall.append((time.perf_counter() - start) / images)
        cpu.append((time.process_time() - start_cpu) / images)
    return 1000 * statistics.median(wall), 1000 * min(wall), 1000 * statistics.median(cpu)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the generation workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def generation_rate(workers: int, per_primitive: int, runs: int) -> dict:
    """ensure_cache on a fresh folder (medians of runs): images/s and CPU ms per image, files included."""
    conf = {**CONF, "generation": {"split_sizes": {"training": per_primitive, "validation": 0, "test": 0}}}
    images = len(ss.split_samples(conf, "training"))
    rates, cpu = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            cache_lib.ensure_cache(tmp, conf, workers=workers, splits=("training",))
            rates.append(images / (time.perf_counter() - start))
            cpu.append((cpu_seconds() - start_cpu) / images)
    return {"processes": workers, "images": images, "images_per_s": statistics.median(rates),
            "best_images_per_s": max(rates), "projected_default_set_s": DEFAULT_SET / statistics.median(rates),
            "projected_best_s": DEFAULT_SET / max(rates), "cpu_ms_per_image": 1000 * statistics.median(cpu),
            "projected_2_free_cores_s": DEFAULT_SET * statistics.median(cpu) / 2}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=20, help="images per primitive and run (generated)")
    parser.add_argument("--reference-images", type=int, default=4, help="images per primitive and run (reference-style)")
    parser.add_argument("--per-primitive", type=int, default=100,
                        help="training images per primitive (before truncate) of the generation runs")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)

    load = os.getloadavg()[0]
    rows = []
    for p in ss.PRIMITIVES:
        row = {"primitive": p}
        row["ms"], row["best_ms"], row["cpu_ms"] = ms_per_image(CONF, p, args.images, args.runs)
        row["ref_res_ms"], row["ref_res_best_ms"], _ = ms_per_image(REFERENCE_CONF, p, args.reference_images,
                                                                    args.runs)
        if p == "draw_multiple_polygons":
            fast_texture, ss._fill_with_texture = ss._fill_with_texture, reference_style_texture
            try:
                row["ref_style_ms"], row["ref_style_best_ms"], _ = ms_per_image(
                    REFERENCE_CONF, p, args.reference_images, args.runs)
            finally:
                ss._fill_with_texture = fast_texture
        rows.append(row)
    print("ms per image in one process: median and best wall time, median CPU time, as generated; "
          "ref_res: the shapes drawn at 960x1280; ref_style: and the polygon textures drawn as the reference does")
    print_table(rows, ["primitive", "ms", "best_ms", "cpu_ms", "ref_res_ms", "ref_res_best_ms", "ref_style_ms",
                       "ref_style_best_ms"])

    gen_rows = [generation_rate(int(w), args.per_primitive, args.runs) for w in args.workers.split(",")]
    print(f"\nensure_cache on the default mix, PNG and points files included; projected for the default set "
          f"of {DEFAULT_SET} images (wall; and from the CPU time, on 2 cores nobody else uses)")
    print_table(gen_rows, ["processes", "images", "images_per_s", "best_images_per_s", "projected_default_set_s",
                           "projected_best_s", "cpu_ms_per_image", "projected_2_free_cores_s"])
    load = max(load, os.getloadavg()[0])
    print(f"\nload average (1 min) up to {load:.1f} on {os.cpu_count()} CPUs during the run: wall times are "
          "inflated when it exceeds the CPU count")
    write_json(args.json, rows + gen_rows + [{"load_average_1min": load, "cpus": os.cpu_count()}])


if __name__ == "__main__":
    main()
