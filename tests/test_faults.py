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
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import datasets
import evaluation
import export
import settings
import train4
from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained
from pipeline import export_descriptor
from test_trainer import TinySquares
from utils import checkpoints as checkpoints_lib
from utils import io as io_lib
from utils import runs
from utils.checkpoints import checkpoints_by_iteration, load_checkpoint, load_weights_into, save_checkpoint
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


def test_the_conversion_recipe_turns_a_trusted_file_into_a_loadable_one(tmp_path, monkeypatch):
    from utils.checkpoints import CONVERSION_RECIPE

    net = SuperPointNet_gauss2()
    old = tmp_path / "old.pth.tar"
    torch.save({"model_state_dict": net.state_dict(), "args": argparse.Namespace(lr=1)}, old)  # pickles a class
    with pytest.raises(DataError):
        load_checkpoint(old)
    # The recipe's program, run here as `python -c` would run it (a subprocess only adds a torch import).
    program = CONVERSION_RECIPE.split('-c "', 1)[1].rsplit('" IN OUT', 1)[0]
    monkeypatch.setattr(sys, "argv", ["-c", str(old), str(tmp_path / "new.pth.tar")])
    exec(program, {})  # noqa: S102 - the project's own one-liner, on a file this test made
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


# ------------------------------------------------------------------------------ 5. training runs

class Flaky(TinySquares):
    """TinySquares whose items listed in `bad` cannot be read (a corrupt file, as a dataset reports it)."""
    default_conf = {**TinySquares.default_conf, "dataset": "Flaky", "bad": []}

    def __getitem__(self, index):
        if index in self.conf["bad"]:
            raise DataError(f"/data/img{index}.jpg: truncated JPEG (no end-of-image marker after the image data)")
        return super().__getitem__(index)


@pytest.fixture
def tiny_training(paths, monkeypatch):
    """train4.py in-process on tiny in-memory datasets, tensorboard runs/ inside tmp_path."""
    monkeypatch.setitem(datasets.DATASETS, "TinySquares", ("test_trainer", "TinySquares"))
    monkeypatch.setitem(datasets.DATASETS, "Flaky", (__name__, "Flaky"))
    monkeypatch.chdir(paths)

    def config(name: str, **overrides) -> str:
        conf = {"data": {"dataset": "TinySquares", "length": 10},
                "model": {"name": "SuperPointNet_gauss2", "batch_size": 4, "eval_batch_size": 4,
                          "learning_rate": 1e-3, "detector_loss": {"loss_type": "cross_entropy"}},
                "training": {"workers_train": 0, "workers_val": 0, "precision": "fp32",
                             "divergence": {"patience": 3}},
                "train_iter": 6, "save_interval": 3, "validation_interval": 2, "tensorboard_interval": 100,
                "validation_size": 1, "seed": 0}
        for key, value in overrides.items():  # dotted keys
            node, *path = conf, *key.split(".")
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        path = paths / f"{name}.yaml"
        path.write_text(yaml.safe_dump(conf))
        return str(path)
    return config


def saved(exper: Path) -> list:
    return [n for n, _ in reversed(checkpoints_by_iteration(exper / "checkpoints"))]


def test_divergence_stops_keeps_the_checkpoint_before_it_and_the_advice_works(tiny_training, paths, capsys):
    exper = paths / "logs" / "div"
    train4.main(["train_base", tiny_training("a"), "div"])
    assert saved(exper) == [3, 6]
    before = load_checkpoint(exper / "checkpoints" / "superPointNet_6_checkpoint.pth.tar")
    capsys.readouterr()
    # A learning rate of 1e6 on resume (the budget and learning rate may change): the loss explodes.
    exits(3, train4.main, ["train_base", tiny_training("b", train_iter=30, **{"model.learning_rate": 1e6}), "div",
                           "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged at iteration ") and "running median" in err
    assert "superPointNet_6_checkpoint.pth.tar, is the one --resume continues from" in err
    assert "Traceback" not in err and "(iteration: loss 7: " in err  # the loss history is quoted
    assert saved(exper) == [3, 6]  # checkpoints written after the divergence began are set aside
    assert list((exper / "checkpoints").glob("*.diverged"))
    # The advice: lower the learning rate and resume. It continues from iteration 6 and trains normally.
    train4.main(["train_base", tiny_training("c", train_iter=12, **{"model.learning_rate": 1e-3}), "div", "--resume"])
    after = load_checkpoint(exper / "checkpoints" / "superPointNet_12_checkpoint.pth.tar")
    assert all(torch.isfinite(v.float()).all() for v in after["model_state_dict"].values())
    assert float(after["loss"]) < 2 * float(before["loss"])
    record = json.loads((exper / "run.json").read_text())
    assert [r["changed"].get("model.learning_rate") for r in record["resumes"]] == [1e6, None]


def test_a_training_run_never_mixes_into_a_used_experiment(tiny_training, paths, capsys):
    exper = paths / "logs" / "mix"
    train4.main(["train_base", tiny_training("a"), "mix", "--eval"])
    rows = (exper / "metrics.jsonl").read_text()
    capsys.readouterr()
    exits(2, train4.main, ["train_base", tiny_training("a"), "mix"])  # a new run over the old one
    assert "--resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    exits(2, train4.main, ["train_base", tiny_training("b", **{"model.batch_size": 2}), "mix", "--resume"])
    assert "model.batch_size (4 -> 2)" in capsys.readouterr().err
    assert saved(exper) == [3, 6] and (exper / "metrics.jsonl").read_text() == rows  # untouched
    train4.main(["train_base", tiny_training("b", **{"model.batch_size": 2}, train_iter=2, save_interval=2), "mix",
                 "--overwrite"])
    assert saved(exper) == [2] and not (exper / "metrics.jsonl").exists()
    assert json.loads((exper / "run.json").read_text())["config"]["model"]["batch_size"] == 2


def test_resume_passes_over_a_truncated_checkpoint_and_does_not_repeat_metrics(tiny_training, paths):
    exper = paths / "logs" / "cut"
    train4.main(["train_base", tiny_training("a", train_iter=5), "cut", "--eval"])  # rows 2, 4, 5; ckpt 3, 5
    latest = exper / "checkpoints" / "superPointNet_5_checkpoint.pth.tar"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short (a full disk, a crash)
    with open(exper / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "prec')  # a row cut short by kill -9
    train4.main(["train_base", tiny_training("a", train_iter=5), "cut", "--eval", "--resume"])
    rows = [json.loads(line)["iteration"] for line in (exper / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 5]
    assert load_checkpoint(latest)["n_iter"] == 5


def test_bad_training_items_are_skipped_counted_and_stop_only_past_the_fraction(tiny_training, paths, capsys):
    exper = paths / "logs" / "bad"
    # One bad item of 10 (fraction 0.1), read in a DataLoader worker process: skipped, named, counted.
    config = tiny_training("a", **{"data.dataset": "Flaky", "data.bad": [7], "training.workers_train": 1})
    train4.main(["train_base", config, "bad"])
    assert saved(exper) == [3, 6]
    assert "skipped item 7: /data/img7.jpg: truncated JPEG" in capsys.readouterr().err
    record = json.loads((exper / "run.json").read_text())["bad_items"]
    assert record["count"] == 1 and "img7.jpg" in record["items"]["item 7"]
    # Three of 10: more than the fraction; the run stops with exit 5 and a checkpoint of where it got.
    config = tiny_training("b", **{"data.dataset": "Flaky", "data.bad": [1, 4, 7], "train_iter": 20})
    exits(5, train4.main, ["train_base", config, "bad3"])
    assert saved(paths / "logs" / "bad3")


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    net = SuperPointNet_gauss2()
    save_checkpoint(tmp_path, 3, net)

    def disk_full(state, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoints_lib.torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write the checkpoint.*earlier checkpoints are intact"):
        save_checkpoint(tmp_path, 6, net)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["superPointNet_3_checkpoint.pth.tar"]
    assert load_checkpoint(tmp_path / "superPointNet_3_checkpoint.pth.tar")["n_iter"] == 3


# ------------------------------------------------------------------ 6. environment faults, signals

def test_exper_path_that_is_a_file_or_read_only_is_one_line_and_exit_4(tiny_training, paths, monkeypatch, capsys):
    blocker = paths / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setattr(settings, "EXPER_PATH", str(blocker))
    exits(4, train4.main, ["train_base", tiny_training("a"), "exp"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker}: Not a directory") and err.count("\n") == 1

    def read_only(path, suffix=""):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(settings, "EXPER_PATH", str(paths / "logs"))
    monkeypatch.setattr(io_lib, "atomic_path", read_only)
    exits(4, train4.main, ["train_base", tiny_training("a"), "exp"])
    err = capsys.readouterr().err
    assert "Read-only file system; choose a writable EXPER_PATH" in err and "Traceback" not in err


def test_signals_become_interruptions_with_their_exit_status():
    with pytest.raises(Interrupted) as e, signals_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert e.value.signum == signal.SIGTERM


def test_logging_follows_a_replaced_stderr_and_survives_a_closed_one(monkeypatch):
    """The commands' log goes to the stderr of the moment: a closed stderr of an earlier caller (a test's
    capture, a notebook cell) is never written to."""
    import io
    import logging
    from utils.cli import setup_logging
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # restored afterwards
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("faults").info("after the swap")
    assert "after the swap" in second.getvalue()


def test_sigterm_during_a_label_export_loses_nothing(paths, random_weights):
    for i in range(40):
        write_image(paths / "data" / "COCO" / "val2014" / f"im{i:02d}.jpg", seed=i)
    config = label_config(paths / "slow.yaml", random_weights, num=30)
    out = paths / "logs" / "labels" / "predictions" / "val"
    env = {"DATA_PATH": str(paths / "data"), "EXPER_PATH": str(paths / "logs")}
    command = [sys.executable, "export.py", "export_detector_homoAdapt", str(config), "labels"]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted (SIGTERM)") and "Traceback" not in err
    done = {p.name for p in out.glob("*.npz")}
    assert 0 < len(done) < 40 and not list(out.glob(".*"))  # whole files only
    summary = (out / "export.txt").read_text()
    assert f"exported: {len(done)}" in summary and "stopped: Interrupted" in summary
    finished = run_cli("export.py", "export_detector_homoAdapt", config, "labels", env=env)  # the same command
    assert finished.returncode == 0, finished.stderr
    assert f"kept_existing: {len(done)}" in (out / "export.txt").read_text()
    assert len(list(out.glob("*.npz"))) == 40


def test_a_truncated_or_tiny_image_is_a_counted_bad_item(paths, random_weights, capsys):
    folder = paths / "data" / "COCO" / "val2014"
    for i in range(4):
        write_image(folder / f"im{i}.jpg", seed=i)
    data = (folder / "im1.jpg").read_bytes()
    (folder / "im1.jpg").write_bytes(data[:len(data) // 2])  # OpenCV would decode this as half grey
    label_export(label_config(paths / "a.yaml", random_weights), "--max-bad-fraction", "0.3")
    out = paths / "logs" / "labels" / "predictions" / "val"
    assert sorted(p.stem for p in out.glob("*.npz")) == ["im0", "im2", "im3"]
    assert "corrupt: 1 (im1)" in (out / "export.txt").read_text()
    assert json.loads((out / "run.json").read_text())["bad_items"]["items"] == ["im1"]
    # The feature export skips a 4x4 image instead of failing on it at every rerun.
    cv2.imwrite(str(paths / "data" / "COCO" / "tiny.png"), np.zeros((4, 4), np.uint8))
    config = paths / "features.yaml"
    config.write_text(f"data: {{root: COCO}}\nmodel: {{name: SuperPointNet_pretrained}}\n"
                      f"pretrained: {random_weights}\n")
    export.main(["export_features", str(config), "feat", "--max-bad-fraction", "0.5"])
    summary = json.loads((paths / "logs" / "feat" / "features.json").read_text())
    assert summary["n_written"] == 3 and {f["image"] for f in summary["failed"]} == {"tiny.png", "val2014/im1.jpg"}
    assert "4x4 is too small" in capsys.readouterr().err


# ------------------------------------------------------------------------- 7. config and CLI values

def test_values_are_checked_once_with_file_key_and_example(tiny_training, paths, capsys):
    exits(2, train4.main, ["train_base", tiny_training("a", **{"training.workers_train": "two"}), "v"])
    err = capsys.readouterr().err
    assert err == f"error: {paths / 'a.yaml'}: 'training.workers_train' is 'two'; expected an integer >= 0, e.g. 1\n"
    assert not (paths / "logs" / "v").exists()  # the refused run left nothing behind (no config.yml)
    train4.main(["train_base", tiny_training("b", **{"model.learning_rate": "1e-3"}, train_iter=1), "v"])  # YAML 1.1
    assert json.loads((paths / "logs" / "v" / "run.json").read_text())["config"]["model"]["learning_rate"] == 0.001


def test_command_line_values_are_blamed_on_the_command_line(paths, random_weights, capsys):
    (paths / "data" / "HPatches" / "v_x").mkdir(parents=True)
    config = paths / "hp.yaml"
    config.write_text(f"data: {{dataset: hpatches, preprocessing: {{resize: [240, 320]}}}}\n"
                      f"model: {{name: SuperPointNet_pretrained, pretrained: {random_weights}}}\n")
    exits(2, export.main, ["export_descriptor", str(config), "x", "--resize", "241", "320"])
    assert "error: command line: '--resize' is [241, 320]; expected [H, W], both positive multiples of 8" in \
        capsys.readouterr().err
    exits(2, export.main, ["export_descriptor", str(config), "x", "--top-k", "-5"])
    assert "error: command line: '--top-k' is -5; expected an integer >= 0" in capsys.readouterr().err
    exits(2, export.main, ["export_descriptor", str(config), "x", "--max-bad-fraction", "2"])
    assert "command line: '--max-bad-fraction' is '2'; expected a number in [0, 1]" in capsys.readouterr().err
    config.write_text(config.read_text().replace("pretrained:", "top_k: -5, pretrained:"))
    exits(2, export.main, ["export_descriptor", str(config), "x"])
    assert f"error: {config}: 'model.top_k' is -5" in capsys.readouterr().err


def test_match_pair_checks_its_output_and_values_before_any_work(tmp_path, random_weights, monkeypatch, capsys):
    import match_pair

    images = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(2)]
    exits(2, match_pair.main, [*images, "--weights", str(random_weights), "--output", str(tmp_path / "m.xyz")])
    assert "error: command line: '--output' is" in capsys.readouterr().err
    exits(2, match_pair.main, [*images, "--weights", str(random_weights), "--top-k", "-5"])
    assert "error: command line: '--top-k' is -5; expected an integer >= 0, e.g. 1000" in capsys.readouterr().err

    def read_only(path, suffix=""):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io_lib, "atomic_path", read_only)
    exits(4, match_pair.main, [*images, "--weights", str(random_weights), "--output", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'm.png'}: Read-only file system; choose a writable EXPER_PATH "
                   f"(or output folder)\n")
