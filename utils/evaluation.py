"""HPatches evaluation of exported predictions (`evaluation.py`, the reference's flags and metrics).

Reads every `<i>.npz` of a predictions folder (the keys of pipeline/export_descriptor.py), computes the metrics of
utils.metrics per pair and writes, next to the predictions:
* `result.txt`  the reference's summary and per-file details (appended, as the reference);
* `result.npz`  the reference's keys: repeatability, localization_err (pairs with error > 0),
                correctness (n_pairs, 6) bool, homography_thresh, mscore, mAP;
* `result.json` every aggregate (`null` where not computed), the counts and the flags used.

Definitions: the reference computed the matching score from (y, x)-swapped points and labelled the NN
mAP's matches by RANSAC inliers, both bugs. By default the matching score and the NN mAP labels use
the ground-truth homography; `compat=True` reproduces the reference's definitions (RANSAC
inliers, (y, x)-swapped matching-score denominator) so that its published table stays comparable.
A file that cannot be read is reported and counted in `n_failed`; a pair without enough matches
for RANSAC is a counted homography failure (incorrect at every threshold). Neither stops the run.

`homography_auc` (result.json, printed) is the AUC at 1, 3 and 5 px of the mean corner error of
LightGlue's and glue-factory's tables (`utils.metrics.homography_auc`), computed from the same
homography as the correctness: OpenCV RANSAC at 3 px on the mutual-NN matches, seeded, so that both
describe one estimate per pair (correctness at eps is the recall curve at eps, the AUC its mean up to
eps); a failed estimate is an infinite error. glue-factory estimates with PoseLib's LO-RANSAC at a
tuned threshold on images resized to a 480 px short side, so its numbers are not these.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from tqdm import tqdm

from utils import draw, metrics
from utils.io import DataError, load_npz, save_image, save_npz, write_json, write_text
from utils.runs import RECORD_NAME as RUN_RECORD

log = logging.getLogger(__name__)

DETECTION_KEYS = ("image", "warped_image", "prob", "warped_prob", "homography")
DESCRIPTION_KEYS = ("desc", "warped_desc")
MATCH_FIGURE_FRACTION = 0.2  # share of the cross-check matches drawn in matching/<i>cv.png (reference)
INLIER_FIGURE_FRACTION = 0.1  # share of inliers and of outliers drawn in matching/<i>m.png (reference)


def prediction_files(pred_dir: Path) -> List[Path]:
    """The prediction files to evaluate, in numeric order.

    A folder written by this project's export (it holds the export's run.json) is read through its
    `index.json`: exactly the files listed there, so a file another run left behind is never mixed
    in (and a missing index means the export did not finish). Other folders (the reference's, older
    exports) give every `<int>.npz`. A missing or empty folder is a DataError.
    """
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: predictions folder not found")
    found = {p.name: p for p in pred_dir.iterdir() if re.fullmatch(r"\d+\.npz", p.name)}
    if (pred_dir / RUN_RECORD).is_file():
        index_path = pred_dir / "index.json"
        if not index_path.is_file():
            raise DataError(f"{pred_dir}: the export into this folder did not finish (no index.json); "
                            f"rerun it (the same command completes it)")
        try:
            listed = [str(entry.get("file", f"{entry['index']}.npz")) for entry in json.loads(index_path.read_text())]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{index_path}: not an export index ({type(e).__name__}: {e})") from e
        ignored = sorted(set(found) - set(listed))
        if ignored:
            log.warning("%s: ignoring %d file(s) that index.json does not list: %s", pred_dir, len(ignored),
                        ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
        files = [pred_dir / name for name in listed]
    else:
        files = list(found.values())
    if not files:
        raise DataError(f"{pred_dir}: no predictions (<i>.npz files) in this folder")
    return sorted(files, key=lambda p: int(p.stem))


def check_prediction(path: Path, data: dict) -> None:
    """Raise a DataError naming the file and key when the arrays do not have the export's shapes."""
    def fail(key, expected):
        raise DataError(f"{path}: key '{key}' has shape {np.shape(data[key])}, expected {expected}")

    shape = np.shape(data["image"])
    if len(shape) != 2:
        fail("image", "(H, W)")
    if np.shape(data["warped_image"]) != shape:
        fail("warped_image", f"{shape} (the shape of 'image')")
    if np.shape(data["homography"]) != (3, 3):
        fail("homography", "(3, 3)")
    h = np.asarray(data["homography"], dtype=np.float64)
    if not np.all(np.isfinite(h)) or abs(np.linalg.det(h)) < 1e-12:
        raise DataError(f"{path}: key 'homography' is not an invertible finite matrix: {h.tolist()}")
    for key in ("prob", "warped_prob"):
        if data[key].ndim != 2 or data[key].shape[1] not in (2, 3):
            fail(key, "(N, 2) [x, y] or (N, 3) [x, y, score]")
        if not np.all(np.isfinite(data[key])):
            raise DataError(f"{path}: key '{key}' has {int((~np.isfinite(data[key])).any(axis=1).sum())} "
                            f"point(s) with NaN or infinite values")
    for points, desc in (("prob", "desc"), ("warped_prob", "warped_desc")):
        if desc in data and (data[desc].ndim != 2 or len(data[desc]) != len(data[points])):
            fail(desc, f"(N, D) with N = {len(data[points])} (the rows of '{points}')")


@dataclass
class PairResult:
    name: str
    repeatability: Optional[float] = None
    localization_err: Optional[float] = None  # -1: no repeated point
    correctness: Optional[np.ndarray] = None  # (6,) bool
    corner_error: Optional[float] = None  # nan when the estimation failed
    homography_failed: bool = False
    mscore: Optional[float] = None
    ap: Optional[float] = None
    figures: dict = field(default_factory=dict)  # relative path -> BGR image


def _cross_check(data: dict):
    """Cross-check matches of the pair and their RANSAC estimate: (Matches, H or None, inliers)."""
    matches = metrics.mutual_nn_matches(data["prob"], data["desc"], data["warped_prob"], data["warped_desc"])
    h_est, inliers = metrics.estimate_homography(matches.points[:, :2], matches.points[:, 2:])
    return matches, h_est, inliers


def _nn_map(data: dict, matches: metrics.Matches, inliers: np.ndarray, sift: bool, compat: bool,
            distance_thresh: float) -> float:
    """The pair's NN mAP term (AP of the matches ranked by descriptor distance); see the module
    docstring for the two definitions."""
    homography = data["homography"]
    if sift:
        # SIFT descriptors are not unit vectors: every cross-check match enters, none is thresholded.
        if compat:
            dmax = matches.distance.max() if len(matches.distance) else 0.0
            return metrics.nn_map(inliers, matches.distance / dmax if dmax > 0 else matches.distance)
        return metrics.nn_map(metrics.correct_matches(matches.points, homography, distance_thresh),
                              matches.distance)
    # Mutual NN closer than the threshold = the cross-check matches closer than it (MagicLeap's matcher).
    close = matches.distance < metrics.NN_MAP_MAX_DISTANCE
    nn = metrics.Matches(*(a[close] for a in matches))
    if compat:
        # The reference estimated its labels in the (y, x)-swapped frame.
        _, labels = metrics.estimate_homography(nn.points[:, [1, 0]], nn.points[:, [3, 2]])
    else:
        labels = metrics.correct_matches(nn.points, homography, distance_thresh)
    return metrics.nn_map(labels, nn.distance)


def _sample(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    return np.sort(rng.choice(n, size=int(n * fraction), replace=False)) if n else np.zeros(0, dtype=int)


def evaluate_pair(name: str, data: dict, *, repeatability: bool, homography: bool, output_images: bool,
                  plot_matching: bool, sift: bool, compat: bool, top_k: int, distance_thresh: float,
                  rng: np.random.Generator) -> PairResult:
    """Metrics (and figures, when asked) of one pair given its npz arrays."""
    out = PairResult(name)
    stem = Path(name).stem
    shape = np.shape(data["image"])
    h_true = np.asarray(data["homography"], dtype=np.float64)
    kp1, kp2 = data["prob"], data["warped_prob"]

    if repeatability:
        rep = metrics.repeatability(kp1, kp2, h_true, shape, keep_k_points=top_k, distance_thresh=distance_thresh)
        out.repeatability, out.localization_err = rep.repeatability, rep.localization_error
        if output_images:
            figure = draw.side_by_side([draw.draw_keypoints(data["image"], kp1),
                                        draw.draw_keypoints(data["warped_image"], kp2)])
            out.figures[f"repeatibility{distance_thresh:g}/{stem}.png"] = draw.add_title(
                figure, f"{name}  rep: {rep.repeatability:.3f}  loc. error: {rep.localization_error:.3f}")

    if homography or plot_matching:
        matches, h_est, inliers = _cross_check(data)
        if homography:
            out.homography_failed = h_est is None
            out.corner_error = metrics.corner_error(h_est, h_true, shape) if h_est is not None else float("nan")
            out.correctness = metrics.homography_correctness(out.corner_error)
            if compat:
                out.mscore = metrics.matching_score_compat(int(inliers.sum()), kp1, kp2, h_true, shape)
            else:
                out.mscore = metrics.matching_score(kp1, kp2, matches, h_true, shape, distance_thresh)
            out.ap = _nn_map(data, matches, inliers, sift, compat, distance_thresh)
        if homography and output_images:
            title = (f"{name}  corner error: {out.corner_error:.2f} px" if h_est is not None
                     else f"{name}  RANSAC failed ({len(matches.idx1)} matches): identity shown")
            out.figures[f"warping/{stem}.png"] = draw.add_title(
                draw.warp_overlay(data["image"], data["warped_image"], h_est if h_est is not None else np.eye(3)),
                title)
            pick = _sample(rng, len(inliers), MATCH_FIGURE_FRACTION)
            out.figures[f"matching/{stem}cv.png"] = draw.add_title(
                draw.draw_matches(data["image"], data["warped_image"], matches.points[pick], inliers[pick]),
                f"{name}  {len(pick)} of {len(inliers)} cross-check matches (green: RANSAC inliers)")
        if plot_matching:
            idx_in, idx_out = np.flatnonzero(inliers), np.flatnonzero(~inliers)
            pick = np.r_[idx_out[_sample(rng, len(idx_out), INLIER_FIGURE_FRACTION)],
                         idx_in[_sample(rng, len(idx_in), INLIER_FIGURE_FRACTION)]].astype(int)
            out.figures[f"matching/{stem}m.png"] = draw.add_title(
                draw.draw_matches(data["image"], data["warped_image"], matches.points[pick], inliers[pick]),
                f"{name}  10% of inliers (green, {len(idx_in)}) and of outliers (red, {len(idx_out)})")
    return out


def _mean(values) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def aggregate(pairs: List[PairResult], failed: List[dict], flags: dict) -> dict:
    """The headline numbers over the evaluated pairs (`None` where not computed)."""
    reps = [p.repeatability for p in pairs if p.repeatability is not None]
    loc = [p.localization_err for p in pairs if p.localization_err is not None and p.localization_err > 0]
    homo = [p for p in pairs if p.correctness is not None]
    correctness = np.array([p.correctness for p in homo]).reshape(-1, len(metrics.HOMOGRAPHY_THRESHOLDS))
    return {
        "repeatability": _mean(reps),
        "localization_err": _mean(loc),
        "homography_correctness": ({str(eps): float(c) for eps, c in
                                    zip(metrics.HOMOGRAPHY_THRESHOLDS, correctness.mean(axis=0))}
                                   if homo else None),
        "homography_auc": metrics.homography_auc([p.corner_error for p in homo]),
        "mscore": _mean([p.mscore for p in homo]),
        "mAP": _mean([p.ap for p in homo]),
        "n_pairs": len(pairs),
        "n_failed": len(failed),
        "failed_files": failed,
        "n_localization_pairs": len(loc),
        "n_homography_failed": sum(p.homography_failed for p in homo),
        "homography_failed_files": [p.name for p in homo if p.homography_failed],
        "mean_corner_error": _mean([p.corner_error for p in homo if not p.homography_failed]),
        "flags": flags,
    }


def _report_text(pred_dir: Path, results: dict, pairs: List[PairResult], flags: dict) -> str:
    """result.txt block in the reference's layout, plus the failures and the flags."""
    def fmt(value):
        return "None" if value is None else str(value)

    lines = [f"path: {pred_dir}", f"output Images: {flags['output_images']}",
             f"compat: {flags['compat']}; sift: {flags['sift']}; top_k: {flags['top_k']}"]
    if flags["repeatability"]:
        lines += [f"repeatability threshold: {flags['distance_thresh']:g}",
                  f"repeatability: {fmt(results['repeatability'])}",
                  f"localization error: {fmt(results['localization_err'])}"]
    if flags["homography"]:
        corr = results["homography_correctness"]
        lines += ["Homography estimation: ",
                  f"Homography threshold: {list(metrics.HOMOGRAPHY_THRESHOLDS)}",
                  f"Average correctness: {np.array(list(corr.values())) if corr else None}",
                  f"homography AUC@1/3/5 px: {results['homography_auc']}",
                  f"nn mean AP: {fmt(results['mAP'])}",
                  f"matching score: {fmt(results['mscore'])}",
                  f"homography estimation failures: {results['n_homography_failed']}"]
    lines.append(f"pairs evaluated: {results['n_pairs']}; files failed: {results['n_failed']}")
    lines.append("====== details =====")
    for p in pairs:
        line = f"file: {p.name}"
        if p.repeatability is not None:
            line += f"; rep: {p.repeatability}"
        if p.correctness is not None:
            line += f"; correct: {p.correctness}; mscore: {p.mscore}:, mean AP: {p.ap}"
        lines.append(line)
    for f in results["failed_files"]:
        lines.append(f"file: {f['file']}; FAILED: {f['error']}")
    lines.append("======== end ========")
    return "\n".join(lines) + "\n"


def _append_text(path: Path, text: str) -> None:
    previous = path.read_text() if path.exists() else ""
    write_text(path, previous + text)


def evaluate_predictions(pred_dir, repeatability: bool = False, homography: bool = False,
                         output_images: bool = False, plot_matching: bool = False, sift: bool = False,
                         compat: bool = False, top_k: int = 1000, distance_thresh: float = 3) -> dict:
    """Evaluate every `<i>.npz` of `pred_dir`; write result.txt / result.npz / result.json there.

    repeatability: repeatability and localisation error. homography: homography correctness at
    eps in metrics.HOMOGRAPHY_THRESHOLDS, matching score and NN mAP. output_images: keypoint, warp and
    match figures for the metrics computed. plot_matching: matching/<i>m.png. sift: predictions
    without scores and with non-unit descriptors (see `_nn_map`). compat: the reference's
    definitions. Returns the aggregates written to result.json.
    """
    pred_dir = Path(pred_dir)
    files = prediction_files(pred_dir)
    flags = {"repeatability": repeatability, "homography": homography, "output_images": output_images,
             "plot_matching": plot_matching, "sift": sift, "compat": compat, "top_k": top_k,
             "distance_thresh": distance_thresh}
    measured = repeatability or homography
    if not measured:
        log.warning("no metric requested (use --repeatibility and/or --homography); result.* are left as they are")
    keys = DETECTION_KEYS + (DESCRIPTION_KEYS if homography or plot_matching else ())

    pairs: List[PairResult] = []
    failed: List[dict] = []
    write_errors: List[str] = []
    for path in tqdm(files, desc="evaluation", unit="pair"):
        try:
            data = load_npz(path, keys=keys)
            check_prediction(path, data)
        except DataError as e:
            log.error("%s", e)
            failed.append({"file": path.name, "error": str(e)})
            continue
        pair = evaluate_pair(path.name, data, repeatability=repeatability, homography=homography,
                             output_images=output_images, plot_matching=plot_matching, sift=sift, compat=compat,
                             top_k=top_k, distance_thresh=distance_thresh, rng=np.random.default_rng(int(path.stem)))
        if pair.homography_failed:
            log.warning("%s: homography estimation failed (fewer than 4 matches or no RANSAC model); "
                        "counted as incorrect", path.name)
        if not write_errors:
            _try_write(write_errors, _save_figures, pred_dir, pair.figures)
        pair.figures = {}
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{pred_dir}: none of the {len(files)} prediction files could be evaluated: "
                        + "; ".join(f["error"] for f in failed))

    results = aggregate(pairs, failed, flags)
    if measured and not write_errors:
        _try_write(write_errors, write_results, pred_dir, results, pairs, flags)
    # The numbers are returned (and printed by the CLI) even when they could not be written.
    results["not_written"] = write_errors[0] if write_errors else None
    return results


def _save_figures(pred_dir: Path, figures: dict) -> None:
    for rel, image in figures.items():
        save_image(pred_dir / rel, image)


def _try_write(errors: list, write, *args) -> None:
    """Call write(*args); an OSError (read-only or full disk...) is logged and kept in `errors`."""
    try:
        write(*args)
    except OSError as e:
        message = f"{e.filename or args[0]}: {e.strerror or e}"
        log.error("could not write the evaluation's files: %s", message)
        errors.append(message)


def write_results(pred_dir: Path, results: dict, pairs: List[PairResult], flags: dict) -> None:
    """result.txt (appended), result.npz and result.json (see the module docstring)."""
    _append_text(pred_dir / "result.txt", _report_text(pred_dir, results, pairs, flags))
    homo = [p for p in pairs if p.correctness is not None]
    save_npz(pred_dir / "result.npz",
             repeatability=np.array([p.repeatability for p in pairs if p.repeatability is not None], dtype=np.float64),
             localization_err=np.array([p.localization_err for p in pairs
                                        if p.localization_err is not None and p.localization_err > 0],
                                       dtype=np.float64),
             correctness=np.array([p.correctness for p in homo], dtype=bool).reshape(
                 -1, len(metrics.HOMOGRAPHY_THRESHOLDS)),
             homography_thresh=np.array(metrics.HOMOGRAPHY_THRESHOLDS),
             mscore=np.array([p.mscore for p in homo], dtype=np.float64),
             mAP=np.array([p.ap for p in homo], dtype=np.float64))
    write_json(pred_dir / "result.json", results)


HEADLINE_HEADER = ["eps=1", "eps=3", "eps=5", "Rep", "MLE", "NN mAP", "M.score", "AUC@1", "AUC@3", "AUC@5"]


def headline_cells(results: dict) -> list[str]:
    """The seven numbers of the reference's README table and the homography AUC at 1, 3, 5 px,
    formatted (n/a where not computed)."""
    corr = results.get("homography_correctness") or {}
    auc = results.get("homography_auc") or {}
    values = [corr.get("1"), corr.get("3"), corr.get("5"), results.get("repeatability"),
              results.get("localization_err"), results.get("mAP"), results.get("mscore"),
              auc.get("1"), auc.get("3"), auc.get("5")]
    return ["n/a" if v is None else f"{v:.3f}" for v in values]


def headline_table(results: dict) -> str:
    """The seven numbers of the reference's README table and the AUC as a markdown table."""
    return "\n".join(["| " + " | ".join(HEADLINE_HEADER) + " |", "|" + "---|" * len(HEADLINE_HEADER),
                      "| " + " | ".join(headline_cells(results)) + " |"])
