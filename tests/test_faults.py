"""The fault catalogue: one test per class of fault that once produced a wrong result without a word,
lost work or ran code. Each test fails if its fault comes back.

Classes: unsafe weight loading; outputs of two runs mixed in one folder (exports, evaluation,
training); results overwritten with nulls; bad input items; environment faults (read-only or full
disk, a path that is a file, signals); file permissions and stale temporaries; divergence; config and
command-line values. Small images, tiny configs and in-process calls keep it fast; subprocesses only
where the exit status and the printed line are what is tested.
"""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import evaluation
import export
import settings
from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained
from pipeline import export_descriptor
from utils import io as io_lib
from utils import runs
from utils.checkpoints import load_checkpoint, load_weights_into
from utils.cli import Interrupted, signals_as_interrupt
from utils.io import DataError, load_npz, write_json

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, env=None, cwd=REPO, timeout=120):
    """A script as users run it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def exits(code: int, call, *args) -> None:
    with pytest.raises(SystemExit) as e:
        call(*args)
    assert e.value.code == code


def write_image(path: Path, h=32, w=48, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    cv2.rectangle(image, (8, 6), (30, 22), (255, 255, 255), -1)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    return tmp_path


# ------------------------------------------------------------------------------- 1. safe loading

class Crafted:
    """Unpickling this object runs a shell command (what a malicious weights file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_weights_file_is_refused_and_never_runs_code(tmp_path, paths, capsys):
    marker = tmp_path / "MARKER_code_ran"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"model_state_dict": SuperPointNet_pretrained().state_dict(), "hook": Crafted(marker)}, evil)
    with pytest.raises(DataError, match="refused: it holds Python objects other than tensors") as e:
        load_checkpoint(evil)
    assert str(evil) in str(e.value) and "weights_only=False" in str(e.value)  # the conversion recipe
    assert not marker.exists()
    # The same file through a command: a one-line refusal, exit 2, still no code run.
    write_image(tmp_path / "data" / "images" / "a.png")
    config = tmp_path / "features.yaml"
    config.write_text("data: {root: images}\nmodel: {name: SuperPointNet_pretrained}\n")
    exits(2, export.main, ["export_features", str(config), "feat", "--weights", str(evil)])
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_the_conversion_recipe_turns_a_trusted_file_into_a_loadable_one(tmp_path):
    from utils.checkpoints import CONVERSION_RECIPE

    net = SuperPointNet_gauss2()
    old = tmp_path / "old.pth.tar"
    torch.save({"model_state_dict": net.state_dict(), "args": argparse.Namespace(lr=1)}, old)  # pickles a class
    with pytest.raises(DataError):
        load_checkpoint(old)
    command = CONVERSION_RECIPE.replace("IN OUT", f"{old} {tmp_path / 'new.pth.tar'}")
    command = command.replace("python", sys.executable, 1)
    assert subprocess.run(command, shell=True, timeout=120).returncode == 0
    load_weights_into(SuperPointNet_gauss2(), tmp_path / "new.pth.tar")


def test_reference_checkpoints_and_magicleap_weights_still_load(tmp_path):
    # The reference's checkpoint layout, in the legacy (non-zip) format of the torch it ran on.
    net = SuperPointNet_gauss2()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.rand(1, 1, 16, 16))["semi"].sum().backward()
    optimizer.step()
    path = tmp_path / "superPointNet_100_checkpoint.pth.tar"
    torch.save({"n_iter": 100, "model_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "loss": torch.tensor(0.25)}, path, _use_new_zipfile_serialization=False)
    fresh = SuperPointNet_gauss2()
    raw = load_weights_into(fresh, path)
    assert raw["n_iter"] == 100 and raw["optimizer_state_dict"]["param_groups"][0]["lr"] == 1e-4
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    magicleap = REPO.parent / "shared" / "data" / "pretrained" / "superpoint_v1.pth"
    if magicleap.is_file():
        load_weights_into(SuperPointNet_pretrained(), magicleap)


# ------------------------------------------------------------ 2. one configuration per output folder

def label_config(path: Path, weights: Path, num: int = 2, resize=(32, 48)) -> Path:
    path.write_text(f"""
data:
  dataset: Coco
  export_folder: val
  preprocessing: {{resize: {list(resize)}}}
  homography_adaptation: {{num: {num}, aggregation: sum}}
model: {{name: SuperPointNet_pretrained, detection_threshold: 0.001, nms: 2, top_k: 20}}
pretrained: {weights}
""")
    return path


def label_export(config: Path, *flags: str):
    export.main(["export_detector_homoAdapt", str(config), "labels", *flags])


def test_a_label_export_never_mixes_two_configurations(paths, random_weights, capsys):
    for i in range(3):
        write_image(paths / "data" / "COCO" / "val2014" / f"im{i}.jpg", seed=i)
    out = paths / "logs" / "labels" / "predictions" / "val"
    first = label_config(paths / "a.yaml", random_weights, num=2)
    label_export(first)
    old = load_npz(out / "im0.npz")["pts"]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["data"]["homography_adaptation"]["num"] == 2
    assert record["weights"]["sha256"] == runs.file_sha256(random_weights) and record["version"]
    assert "export_detector_homoAdapt" in record["command"]
    capsys.readouterr()

    # Another number of homographies or another resize: refused, naming the keys; nothing touched.
    other = label_config(paths / "b.yaml", random_weights, num=3, resize=(40, 48))
    for flags in ((), ("--resume",)):
        exits(2, label_export, other, *flags)
        err = capsys.readouterr().err
        assert "data.homography_adaptation.num (2 -> 3)" in err and "data.preprocessing.resize" in err
        assert "--overwrite" in err and "Traceback" not in err
    assert np.array_equal(load_npz(out / "im0.npz")["pts"], old)

    # The same configuration again completes the export and keeps what is done.
    (out / "im1.npz").unlink()
    label_export(first)
    assert "1 images" in capsys.readouterr().out and np.array_equal(load_npz(out / "im0.npz")["pts"], old)

    # --overwrite starts clean: a label of an image gone from the dataset does not survive.
    (paths / "data" / "COCO" / "val2014" / "im2.jpg").unlink()
    label_export(other, "--overwrite")
    assert sorted(p.name for p in out.glob("*.npz")) == ["im0.npz", "im1.npz"]
    assert load_npz(out / "im0.npz")["image_size"].tolist() == [40, 48]
    assert json.loads((out / "run.json").read_text())["config"]["data"]["homography_adaptation"]["num"] == 3
    assert "exported: 2" in (out / "export.txt").read_text()


class Pairs:
    """A stand-in HPatches dataset: `failing` pairs cannot be read."""

    def __init__(self, n: int, failing=()):
        self.pairs = [{"name": f"seq/1_{i + 2}", "image": "a", "warped_image": "b", "homography": "h"}
                      for i in range(n)]
        self.failing, self.skipped = set(failing), []

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if i in self.failing:
            raise DataError(f"pair {i}: unreadable image")
        image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(i))
        return {"image": image, "warped_image": image, "homography": torch.eye(3)}


def describe(sample):
    """Three points, identical in both images (a perfect pair)."""
    prob = np.array([[5.0, 6, 0.9], [20, 10, 0.8], [12, 25, 0.7]])
    desc = np.eye(3, 8, dtype=np.float32)
    return {"prob": prob, "warped_prob": prob, "desc": desc, "warped_desc": desc, "matches": np.zeros((0, 4))}


def export_pairs_into(exper: str, dataset, flags=()):
    args = argparse.Namespace(resume="--resume" in flags, overwrite="--overwrite" in flags)
    predictions, plan = export_descriptor.prepare_output(exper, {"model": {"pretrained": None}, "n": len(dataset)},
                                                         "test", args.resume, args.overwrite)
    return predictions, export_descriptor.export_pairs(dataset, describe, predictions, plan.mode == "resume",
                                                       max_bad_fraction=0.5)


def test_stale_predictions_are_never_evaluated(paths):
    predictions, _ = export_pairs_into("hp", Pairs(4))
    assert sorted(p.name for p in predictions.glob("*.npz")) == ["0.npz", "1.npz", "2.npz", "3.npz"]
    # A new export into the same folder: refused without a flag...
    with pytest.raises(runs.RunConflict, match=r"differing: config.n|n \(4 -> 3\)"):
        export_pairs_into("hp", Pairs(3, failing={1}))
    # ... and with --overwrite the files of the old run are gone, the failed pair's included.
    _, summary = export_pairs_into("hp", Pairs(3, failing={1}), ["--overwrite"])
    assert sorted(p.name for p in predictions.glob("*.npz")) == ["0.npz", "2.npz"]
    assert summary["n_failed"] == 1 and "seq/1_3" in summary["failed"][0]["name"]
    index = json.loads((predictions / "index.json").read_text())
    assert [e["file"] for e in index] == ["0.npz", "2.npz"] and index[1]["name"] == "seq/1_4"
    # A file the export did not list (left by hand, or by anything else) is not read.
    np.savez(predictions / "7.npz", image=np.zeros((2, 2)))
    results = evaluation.evaluate_predictions(predictions, repeatability=True)
    assert results["n_pairs"] == 2 and results["n_failed"] == 0 and results["repeatability"] == 1.0
    # An export that never finished (no index) is not evaluated at all.
    (predictions / "index.json").unlink()
    with pytest.raises(DataError, match="did not finish"):
        evaluation.evaluate_predictions(predictions, repeatability=True)


# -------------------------------------------------------------------------- 3. evaluation results

def test_evaluation_without_metrics_keeps_results_and_prints_when_it_cannot_write(paths, monkeypatch, capsys):
    predictions, _ = export_pairs_into("hp", Pairs(2))
    assert evaluation.main([str(predictions), "--repeatibility"]) is None
    before = {name: (predictions / name).read_bytes() for name in ("result.json", "result.npz", "result.txt")}
    evaluation.main([str(predictions)])  # no metric flag: nothing to record, nothing overwritten
    assert all((predictions / name).read_bytes() == data for name, data in before.items())
    capsys.readouterr()

    def read_only(path, suffix=""):  # the disk refuses every write, as a read-only mount does
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io_lib, "atomic_path", read_only)
    exits(4, evaluation.main, [str(predictions), "--repeatibility"])
    out, err = capsys.readouterr()
    assert "| eps=1 | eps=3 | eps=5 | Rep |" in out and "| n/a | n/a | n/a | 1.000 |" in out  # numbers kept
    assert "could not be written" in err and "Read-only file system" in err and "Traceback" not in err


def test_nan_keypoints_are_a_failed_file_not_a_number(paths):
    predictions, _ = export_pairs_into("hp", Pairs(2))
    data = dict(np.load(predictions / "1.npz"))
    data["prob"][0, 0] = np.nan
    np.savez(predictions / "1.npz", **data)
    results = evaluation.evaluate_predictions(predictions, repeatability=True)
    assert results["n_pairs"] == 1 and results["n_failed"] == 1 and "NaN" in results["failed_files"][0]["error"]


# --------------------------------------------------------------------- 4. files, umask, temporaries

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_a_stale_temporary_beside_an_output_is_removed(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    stale = tmp_path / ".a.json.k3j2_x9q.json"  # left by a write killed before its rename
    stale.write_text("{half")
    unrelated = tmp_path / ".a.json.notes"
    unrelated.write_text("not ours")
    write_json(tmp_path / "a.json", {"x": 2})
    assert not stale.exists() and unrelated.exists()
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
