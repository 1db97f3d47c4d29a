"""The trainer on a tiny in-test dataset: exact iteration counts and checkpoints, exact resume, NaN
handling, Ctrl-C, validation metrics, a loss that falls, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import datasets
from pipeline import trainer as trainer_lib
from pipeline import training_settings
from pipeline import training_run
from utils.divergence import TrainingDiverged
from models import get_model
from utils import distributed
from utils import metrics as metrics_lib
from utils.checkpoints import load_checkpoint
from utils.config import ConfigError, merge

REPO = Path(__file__).resolve().parents[1]
SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


class TinySquares(torch.utils.data.Dataset):
    """32 x 32 images of one bright square on a darker background, labelled at its 4 corner pixels;
    sample i depends only on (seed, task, i). `nan`: 'first' gives sample 0 a NaN image, 'all' every
    sample. `pair`: a warped pair that is the horizontal mirror image."""

    default_conf = {"dataset": "TinySquares", "length": 10, "nan": "none", "pair": False, "delay": 0.0}

    def __init__(self, conf=None, task="train", seed=0):
        self.conf = merge(self.default_conf, conf)
        self.task, self.seed = task, seed

    def __len__(self):
        return self.conf["length"]

    def __getitem__(self, index):
        time.sleep(self.conf["delay"])
        rng = np.random.default_rng([self.seed, self.task == "val", index])
        side = int(rng.integers(10, 18))
        x0, y0 = (int(v) for v in rng.integers(4, SIZE - side - 4, size=2))
        image = np.full((SIZE, SIZE), 0.1 + 0.2 * rng.random(), np.float32)
        image[y0:y0 + side, x0:x0 + side] = 0.9
        labels = np.zeros((SIZE, SIZE), np.float32)
        for x in (x0, x0 + side - 1):
            for y in (y0, y0 + side - 1):
                labels[y, x] = 1
        if self.conf["nan"] == "all" or (self.conf["nan"] == "first" and index == 0):
            image[:] = np.nan
        sample = {"image": torch.from_numpy(image)[None], "labels_2D": torch.from_numpy(labels)[None],
                  "valid_mask": torch.ones(1, SIZE, SIZE), "name": f"{self.task}_{index}"}
        if self.conf["pair"]:
            sample.update({"warped_img": sample["image"].flip(-1), "warped_labels": sample["labels_2D"].flip(-1),
                           "warped_valid_mask": torch.ones(1, SIZE, SIZE),
                           "homographies": torch.tensor([[-1.0, 0, SIZE - 1], [0, 1, 0], [0, 0, 1]])})
        return sample


def register_tiny_dataset():
    datasets.DATASETS["TinySquares"] = (__name__, "TinySquares")


@pytest.fixture(autouse=True)
def tiny_dataset(monkeypatch):
    monkeypatch.setitem(datasets.DATASETS, "TinySquares", (__name__, "TinySquares"))


def deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_conf(**overrides) -> dict:
    user = {
        "data": {"dataset": "TinySquares", "length": 10},
        "model": {"name": "SuperPointNet_gauss2", "batch_size": 4, "eval_batch_size": 4, "learning_rate": 1e-3,
                  "detector_loss": {"loss_type": "cross_entropy"}},
        "training": {"workers_train": 0, "workers_val": 0, "precision": "fp32"},
        "train_iter": 6, "save_interval": 3, "validation_interval": 100, "tensorboard_interval": 2,
        "validation_size": 2, "seed": 0,
    }
    return merge(training_settings.default_conf, deep_update(user, overrides))


def run(tmp_path, conf, name="exp", **kwargs) -> dict:
    return training_run.train(conf, name, "train_base", exper_root=tmp_path / "logs", runs_root=tmp_path / "runs",
                             **kwargs)


def checkpoints(folder: Path) -> list:
    return sorted(int(p.name.split("_")[1]) for p in (folder / "checkpoints").glob("superPointNet_*"))


def adam_steps(state: dict) -> set:
    return {int(s["step"]) for s in state["optimizer_state_dict"]["state"].values()}


def test_exact_iterations_and_checkpoints(tmp_path):
    summary = run(tmp_path, make_conf(train_iter=5, save_interval=2))
    exp = tmp_path / "logs" / "exp"
    assert summary["iterations"] == 5
    assert checkpoints(exp) == [2, 4, 5]
    final = load_checkpoint(exp / "checkpoints" / "superPointNet_5_checkpoint.pth.tar")
    assert final["n_iter"] == 5
    assert adam_steps(final) == {5}  # every parameter stepped exactly train_iter times
    assert set(final["model_state_dict"]) == set(get_model("SuperPointNet_gauss2").state_dict())
    assert "dataset: TinySquares" in (exp / "config.yml").read_text()
    assert list((tmp_path / "runs" / "train_base").glob("exp_*/events.out.tfevents.*"))


def assert_same_state(a: dict, b: dict):
    assert a["n_iter"] == b["n_iter"]
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    sa, sb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(sa[index][key]), torch.as_tensor(sb[index][key])), (index, key)


def test_resume_continues_exactly(tmp_path):
    # 10 samples, batch 4: 2 iterations per epoch, so the resume at 3 lands in the middle of epoch 1.
    run(tmp_path, make_conf(train_iter=6, save_interval=3), name="straight")
    run(tmp_path, make_conf(train_iter=3, save_interval=3), name="split")
    summary = run(tmp_path, make_conf(train_iter=6, save_interval=3), name="split", resume=True)
    assert summary["start_iteration"] == 3
    ckpt = "checkpoints/superPointNet_6_checkpoint.pth.tar"
    assert_same_state(load_checkpoint(tmp_path / "logs/straight" / ckpt), load_checkpoint(tmp_path / "logs/split" / ckpt))
    # The same through the config keys of the reference.
    conf = make_conf(train_iter=6, save_interval=3, retrain=False, reset_iter=False,
                     pretrained=str(tmp_path / "logs/split/checkpoints/superPointNet_3_checkpoint.pth.tar"))
    run(tmp_path, conf, name="by_config")
    assert_same_state(load_checkpoint(tmp_path / "logs/straight" / ckpt), load_checkpoint(tmp_path / "logs/by_config" / ckpt))


def test_reset_iter_and_plain_state_dict(tmp_path):
    run(tmp_path, make_conf(train_iter=2, save_interval=2), name="first")
    ckpt = load_checkpoint(tmp_path / "logs/first/checkpoints/superPointNet_2_checkpoint.pth.tar")
    # reset_iter: the count restarts at 0, model and optimizer still come from the checkpoint.
    conf = make_conf(train_iter=1, retrain=False, reset_iter=True,
                     pretrained=str(tmp_path / "logs/first/checkpoints/superPointNet_2_checkpoint.pth.tar"))
    summary = run(tmp_path, conf, name="reset")
    assert summary["start_iteration"] == 0 and summary["iterations"] == 1
    assert adam_steps(load_checkpoint(tmp_path / "logs/reset/checkpoints/superPointNet_1_checkpoint.pth.tar")) == {3}
    # A plain state_dict (.pth, e.g. MagicLeap's weights): weights only, fresh optimizer.
    weights = tmp_path / "weights.pth"
    torch.save(ckpt["model_state_dict"], weights)
    tr = trainer_lib.Trainer(make_conf(retrain=False, reset_iter=False, pretrained=str(weights)), tmp_path / "w")
    assert tr.n_iter == 0 and not tr.optimizer.state
    for key, value in tr.net.state_dict().items():
        assert torch.equal(value, ckpt["model_state_dict"][key])
    with pytest.raises(ConfigError, match="pretrained"):
        trainer_lib.Trainer(make_conf(retrain=False), tmp_path / "none")


def test_nan_batches_are_skipped_and_counted(tmp_path):
    # Sample 0 is NaN: exactly one of the 2 batches of every epoch is skipped.
    summary = run(tmp_path, make_conf(data={"nan": "first"}, train_iter=6, save_interval=6))
    assert summary["iterations"] == 6 and summary["nan_skipped"] == 3
    final = load_checkpoint(tmp_path / "logs/exp/checkpoints/superPointNet_6_checkpoint.pth.tar")
    assert adam_steps(final) == {3}
    assert final["nan_skipped"] == 3
    for key, value in final["model_state_dict"].items():  # BatchNorm statistics included
        assert torch.isfinite(value.float()).all(), key


def test_repeated_nans_stop_without_writing_a_checkpoint_of_the_diverged_state(tmp_path):
    conf = make_conf(data={"nan": "all"}, train_iter=20, save_interval=20, training={"nan_patience": 3})
    with pytest.raises(TrainingDiverged,
                       match="iteration 3: .*NaN.* 3 consecutive iterations from iteration 1.*no checkpoint"):
        run(tmp_path, conf)
    assert checkpoints(tmp_path / "logs/exp") == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interruption_saves_a_checkpoint(tmp_path, monkeypatch, how):
    calls = {"n": 0}
    real_step = trainer_lib.Trainer.train_step

    def interrupted_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", interrupted_step)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, make_conf(train_iter=6, save_interval=100))
    assert checkpoints(tmp_path / "logs/exp") == [2]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_validation_rows_and_warped_pair(tmp_path):
    conf = make_conf(data={"pair": True}, train_iter=4, save_interval=4, validation_interval=2)
    summary = run(tmp_path, conf, validate=True)
    rows = [json.loads(line) for line in (tmp_path / "logs/exp/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    for row in rows:
        assert {"precision", "recall", "mAP", "loss", "loss_det", "loss_det_warp"} <= set(row)
        assert row["loss"] == pytest.approx(row["loss_det"] + row["loss_det_warp"], rel=1e-5)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["mAP"] <= 1
    assert summary["validation"]["loss"] == rows[-1]["loss"]


@pytest.mark.parametrize("loss_type", ["softmax", "cross_entropy"])
def test_a_short_run_lowers_the_loss(tmp_path, loss_type):
    # 4 samples, batch 4: every iteration sees the same images, so the loss must fall steadily.
    conf = make_conf(data={"length": 4}, model={"detector_loss": {"loss_type": loss_type}})
    tr = trainer_lib.Trainer(conf, tmp_path)
    batches = tr.data.batches(tr.n_iter)
    losses = [float(tr.train_step(next(batches))[0]["loss"]) for _ in range(12)]
    batches.close()
    assert losses[-1] < 0.75 * losses[0], losses
    assert np.mean(losses[-3:]) < np.mean(losses[3:6]) < np.mean(losses[:3]), losses


def test_bf16_training_step_and_precision_errors(tmp_path):
    tr = trainer_lib.Trainer(make_conf(training={"precision": "bf16"}), tmp_path)
    assert tr.channels_last  # CPU default
    batches = tr.data.batches(tr.n_iter)
    losses, out, stepped = tr.train_step(next(batches))
    batches.close()
    assert stepped and out["semi"].dtype == torch.float32 and losses["loss"].dtype == torch.float32
    with pytest.raises(ConfigError, match="training.precision"):
        trainer_lib.Trainer(make_conf(training={"precision": "fp16"}), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="batch"):
        trainer_lib.Trainer(make_conf(data={"length": 3}), tmp_path)


# ---------------------------------------------------------------------------------------- metrics

def test_match_detections_is_greedy_one_to_one():
    gt = np.array([[10.0, 10.0], [20.0, 10.0]])
    pred = np.array([[11.0, 10.0], [10.0, 12.0], [22.5, 10.0], [40.0, 40.0]])  # sorted by score
    # The first takes label 0; the second is near label 0 only, which is taken; the third takes label 1.
    assert match_list(pred, gt) == [True, False, True, False]
    assert match_list(pred[:0], gt) == [] and match_list(pred, gt[:0]) == [False] * 4


def match_list(pred, gt):
    return metrics_lib.match_detections(pred, gt, 3.0).tolist()


def test_detection_metrics_by_hand():
    heatmap = torch.zeros(1, 64, 80)
    labels = torch.zeros(1, 1, 64, 80)
    for x, y in [(10, 10), (30, 20), (50, 40), (2, 30)]:  # the last is in the 4-pixel border: ignored
        labels[0, 0, y, x] = 1
    heatmap[0, 10, 11] = 0.9  # 1 px from (10, 10): correct
    heatmap[0, 24, 30] = 0.5  # 4 px from (30, 20): wrong
    heatmap[0, 40, 50] = 0.02  # correct
    heatmap[0, 50, 60] = 0.01  # below the 0.015 threshold: only in the mAP ranking (wrong)
    heatmap[0, 10, 13] = 0.8  # within the NMS radius of the 0.9 peak: suppressed
    metrics = metrics_lib.DetectionMetrics()
    (kept,) = metrics.update(heatmap, labels)
    assert sorted(map(tuple, kept.tolist())) == [(11, 10), (30, 24), (50, 40)]
    result = metrics.compute()
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    # Ranking: correct, wrong, correct, wrong over 3 labels: AP = 1/3 * 1 + 1/3 * 2/3.
    assert result["mAP"] == pytest.approx(1 / 3 + 2 / 9)


# ---------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["magicpoint_shapes_pair.yaml", "magicpoint_shapes_quick.yaml",
                                  "magicpoint_shapes_pretrained.yaml", "superpoint_mix_train.yaml", "superpoint_mix_finetune.yaml",
                                  "superpoint_mix_viewpoint.yaml",
                                  "superpoint_coco_train_heatmap.yaml"])
def test_shipped_configs_validate(name):
    from utils.config import load_config
    conf = load_config(REPO / "configs" / name, training_settings.default_conf)
    dataset = datasets.get_dataset_class(conf["data"]["dataset"])
    merge(dataset.default_conf, conf["data"], source=name)


def test_kill_9_then_resume_continues_from_the_last_checkpoint(tmp_path):
    """The CLI killed with SIGKILL mid-run, then the same command with --resume, ends in the state of
    an uninterrupted run (model, optimizer, iteration)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "data": {"dataset": "TinySquares", "delay": 0.05},
        "model": {"batch_size": 4, "eval_batch_size": 4, "detector_loss": {"loss_type": "cross_entropy"}},
        # threads fixed: 'auto' follows the machine's load, and another thread count sums in another order
        "training": {"workers_train": 0, "precision": "fp32", "threads": 1},
        "train_iter": 8, "save_interval": 2, "tensorboard_interval": 100, "seed": 0}))  # JSON is YAML
    launcher = (f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {str(REPO / 'tests')!r}); "
                "import datasets; "
                "datasets.DATASETS['TinySquares'] = ('test_trainer', 'TinySquares'); import train4; train4.main()")
    command = [sys.executable, "-c", launcher, "train_base", str(config), "killed"]
    env = {**os.environ, "EXPER_PATH": str(tmp_path / "logs")}
    folder = tmp_path / "logs" / "killed"
    proc = subprocess.Popen(command, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (folder / "checkpoints/superPointNet_2_checkpoint.pth.tar").exists() and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait()
    assert proc.returncode == -9
    done = checkpoints(folder)
    assert 2 in done and 8 not in done
    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"superPointNet_{max(done)}_checkpoint.pth.tar: model, optimizer, iteration {max(done)}" in resumed.stderr
    from utils.config import load_config
    run(tmp_path, load_config(config, training_settings.default_conf), name="straight")
    ckpt = "checkpoints/superPointNet_8_checkpoint.pth.tar"
    assert_same_state(load_checkpoint(tmp_path / "logs/straight" / ckpt), load_checkpoint(folder / ckpt))


def test_cli_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: TinySquares}\ntrain_iterr: 5\n")
    proc = subprocess.run([sys.executable, "train4.py", "train_base", str(bad), "x"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "EXPER_PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "train_iterr" in proc.stderr and "train_iter" in proc.stderr


# ---------------------------------------------------------------------------------------- DDP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_OVERRIDES = dict(model={"name": "SuperPointNet_pretrained"}, data={"length": 12}, train_iter=3, save_interval=3)


def ddp_worker(rank: int, world: int, port: int, root: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    register_tiny_dataset()
    summary = training_run.train(make_conf(**DDP_OVERRIDES), "ddp", "train_base", exper_root=Path(root) / "logs",
                                runs_root=Path(root) / "runs")
    sampler = distributed.ResumableSampler(TinySquares({"length": 12}), distributed.DistributedContext(rank, world),
                                           shuffle=True, seed=0)
    sampler.set_position(0, 0)
    report = {"indices": list(sampler), "checkpoint": summary["checkpoint"] and str(summary["checkpoint"]),
              "iterations": summary["iterations"]}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(report))


def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes with half the batch each take the same steps as one process with the whole
    batch (SuperPointNet_pretrained has no BatchNorm, so the averaged gradients are identical)."""
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["iterations"] for r in reports] == [3, 3]
    assert reports[1]["checkpoint"] is None and reports[0]["checkpoint"].endswith("superPointNet_3_checkpoint.pth.tar")
    assert not set(reports[0]["indices"]) & set(reports[1]["indices"])
    assert len(reports[0]["indices"]) == len(reports[1]["indices"]) == 6
    assert not (tmp_path / "logs/ddp/metrics.jsonl").exists()
    run(tmp_path, make_conf(**DDP_OVERRIDES), name="single")
    ddp = load_checkpoint(tmp_path / "logs/ddp/checkpoints/superPointNet_3_checkpoint.pth.tar")
    single = load_checkpoint(tmp_path / "logs/single/checkpoints/superPointNet_3_checkpoint.pth.tar")
    for key, value in single["model_state_dict"].items():
        torch.testing.assert_close(ddp["model_state_dict"][key], value, rtol=1e-4, atol=1e-5)


def test_learning_rate_steps_down_at_milestones_and_resume_follows(tmp_path):
    conf = make_conf(train_iter=6, save_interval=2, model={"learning_rate": 1e-2},
                     training={"lr_milestones": [2, 4], "lr_decay": 0.5})
    run(tmp_path, make_conf(**{**conf, "train_iter": 2}), name="split")
    run(tmp_path, conf, name="split", resume=True)
    exp = tmp_path / "logs" / "split" / "checkpoints"
    # The state after n iterations holds the rate of the last step taken (iteration n - 1, 0-based).
    expected = {2: 1e-2, 4: 5e-3, 6: 2.5e-3}
    for n, lr in expected.items():
        groups = load_checkpoint(exp / f"superPointNet_{n}_checkpoint.pth.tar")["optimizer_state_dict"]["param_groups"]
        assert groups[0]["lr"] == pytest.approx(lr)
    with pytest.raises(ConfigError, match="training.lr_milestones"):
        run(tmp_path, make_conf(training={"lr_milestones": [0]}), name="bad")


def test_numeric_strings_in_the_config_are_numbers(tmp_path):
    # YAML 1.1 reads `learning_rate: 1e-3` as the string '1e-3'; the trainer's checks turn it into 0.001.
    tr = trainer_lib.Trainer(make_conf(model={"learning_rate": "1e-3"}, training={"lr_decay": "5e-1"}), tmp_path)
    assert tr.optimizer.param_groups[0]["lr"] == 0.001
    assert tr.learning_rate(0) == 0.001 and tr.conf["training"]["lr_decay"] == 0.5
    with pytest.raises(ConfigError, match="'model.learning_rate' is 'fast'; expected a number > 0, e.g. 0.001"):
        trainer_lib.Trainer(make_conf(model={"learning_rate": "fast"}), tmp_path)
