"""Fine-tuning MagicLeap's SuperPoint on COCO labels (configs/superpoint_coco_finetune_magicleap.yaml) keeps
its HPatches quality: labels by homography adaptation with MagicLeap's weights on a few shared COCO images,
a short fine-tune with the shipped config, then the HPatches export and evaluation of the start weights and
of the fine-tuned checkpoint, all through the project's own CLI functions, in this process."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export
import settings
from pipeline import training_settings
from pipeline import training_run
from utils.checkpoints import load_checkpoint
from utils.config import load_config
from utils.evaluation import evaluate_predictions, headline_table

REPO = Path(__file__).resolve().parents[1]
FINETUNE_CONFIG = REPO / "configs" / "superpoint_coco_finetune_magicleap.yaml"
LABELS_EXPER = "magicleap_homoAdapt_coco"  # where the shipped config's relative `labels` points
N_TRAIN, N_VAL = 16, 2  # COCO images labelled for training / validation
HOMOGRAPHIES = 10
TRAIN_ITER = 30
# Labels and training at a quarter of the config's 240x320 keep the test within its time budget; Adam's
# step size does not depend on the image size, so the learning rate is tested all the same. HPatches is
# evaluated at the protocol's 240x320.
TRAIN_SIZE = [120, 160]

pytestmark = pytest.mark.usefixtures("one_thread")


def link_subset(shared_data: Path, data: Path) -> None:
    """DATA_PATH with the first COCO images of the shared data and its HPatches, as symbolic links."""
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        folder = data / "COCO" / f"{split}2014"
        folder.mkdir(parents=True)
        for image in sorted((shared_data / "COCO" / f"{split}2014").iterdir())[:n]:
            (folder / image.name).symlink_to(image)
    (data / "HPatches").symlink_to(shared_data / "HPatches")


def write_label_config(path: Path, split: str, weights: Path) -> Path:
    """configs/magicpoint_coco_export.yaml switched to MagicLeap's network, as its comment says."""
    conf = yaml.safe_load((REPO / "configs" / "magicpoint_coco_export.yaml").read_text())
    conf["data"]["export_folder"] = split
    conf["data"]["preprocessing"]["resize"] = TRAIN_SIZE
    conf["data"]["homography_adaptation"]["num"] = HOMOGRAPHIES
    conf["model"]["name"] = "SuperPointNet_pretrained"
    conf["pretrained"] = str(weights)
    path.write_text(yaml.safe_dump(conf))
    return path


def hpatches_results(exper: Path, name: str, weights: Path) -> dict:
    export.main(["export_descriptor", str(REPO / "configs" / "magicleap_hpatches_export.yaml"), name,
                 "--weights", str(weights)])
    return evaluate_predictions(exper / name / "predictions", repeatability=True, homography=True)


@pytest.mark.slow
def test_finetuning_magicleap_keeps_hpatches_homography_correctness(tmp_path, monkeypatch, shared_data,
                                                                   magicleap_weights, hpatches):
    started = time.perf_counter()
    data, exper = tmp_path / "data", tmp_path / "logs"
    link_subset(shared_data, data)
    monkeypatch.setattr(settings, "DATA_PATH", str(data))
    monkeypatch.setattr(settings, "EXPER_PATH", str(exper))

    # Labels: homography adaptation of MagicLeap's network.
    for split in ("train", "val"):
        export.main(["export_detector_homoAdapt", str(write_label_config(tmp_path / f"{split}.yaml", split,
                                                                           magicleap_weights)), LABELS_EXPER])
    predictions = exper / LABELS_EXPER / "predictions"
    assert len(list((predictions / "train").glob("*.npz"))) == N_TRAIN
    assert len(list((predictions / "val").glob("*.npz"))) == N_VAL
    labelled = time.perf_counter()

    # Fine-tune with the shipped config, shortened.
    conf = load_config(FINETUNE_CONFIG, training_settings.default_conf)
    assert conf["model"]["name"] == "SuperPointNet_pretrained" and not conf["retrain"]
    conf["pretrained"] = str(magicleap_weights)
    conf["data"]["preprocessing"]["resize"] = TRAIN_SIZE
    conf["model"].update(batch_size=2, eval_batch_size=2)
    conf["training"].update(workers_train=0, workers_val=0)
    conf.update(train_iter=TRAIN_ITER, save_interval=TRAIN_ITER, validation_interval=TRAIN_ITER, validation_size=1)
    summary = training_run.train(conf, "finetune", "train_joint", validate=True, exper_root=exper,
                                runs_root=tmp_path / "runs", source=str(FINETUNE_CONFIG))
    assert summary["iterations"] == TRAIN_ITER and summary["nan_skipped"] == 0
    assert summary["validation"]["matches"] > 0
    checkpoint = Path(summary["checkpoint"])
    start = torch.load(magicleap_weights, weights_only=True)
    tuned = load_checkpoint(checkpoint)["model_state_dict"]
    change = torch.cat([(tuned[k] - start[k]).flatten() for k in start]).abs()
    assert change.median() > 0  # the fine-tune did move the weights
    trained = time.perf_counter()

    before = hpatches_results(exper, "hpatches_start", magicleap_weights)
    after = hpatches_results(exper, "hpatches_finetuned", checkpoint)
    report = (f"MagicLeap start:\n{headline_table(before)}\nfine-tuned {TRAIN_ITER} iterations at learning rate "
              f"{conf['model']['learning_rate']:g}:\n{headline_table(after)}\nmedian weight change "
              f"{change.median():.2e}; labels {labelled - started:.0f} s, training {trained - labelled:.0f} s, "
              f"HPatches {time.perf_counter() - trained:.0f} s")
    print("\n" + report)
    # The start has MagicLeap's quality (so that keeping it means something) ...
    assert before["homography_correctness"]["3"] >= 0.8 and before["repeatability"] > 0.65, report
    # ... and the fine-tune keeps it. Homography correctness is a count of pairs whose RANSAC estimate lands
    # within 3 px, so a change in the last bits of the descriptors (another CPU's kernels, float rounding in
    # the warps) can move one pair across: one pair is allowed, no more. Measured: the config's 1e-5 gives
    # eps=3 0.9 or 0.8 by CPU, repeatability 0.671, NN mAP 0.762 on both; 3e-5 gives 0.8, 0.655, 0.759;
    # 1e-4 fails every check: eps=3 0.5, repeatability 0.553, NN mAP 0.671.
    one_pair = 1 / before["n_pairs"]
    assert after["homography_correctness"]["3"] >= before["homography_correctness"]["3"] - one_pair - 1e-9, report
    assert after["repeatability"] >= before["repeatability"] - 0.06, report
    assert after["mAP"] >= before["mAP"] - 0.08, report
    assert np.isfinite(after["localization_err"]) and after["n_failed"] == 0, report
