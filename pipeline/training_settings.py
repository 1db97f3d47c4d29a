"""The training settings: `default_conf` (every key of the reference's training configs, so they run
unchanged) and `check_training_conf`, the one check of a training config's values at load, whose
errors name the config file and the dotted key. Also what a resumed run may change (`RESUMABLE_KEYS`)
and what makes an experiment folder used (`OUTPUTS`)."""
from __future__ import annotations

from functools import partial
from typing import Mapping

from models import extractor
from utils import precision as precision_lib
from utils.config import (IGNORED, OPEN, check_choice, check_int, check_list, check_number, check_positive,
                          combine, require)

# Every top-level and model key of the reference's training configs (magicpoint_shapes_pair.yaml,
# superpoint_{coco,kitti}_train_heatmap.yaml), so they run unchanged; keys its code ignored are IGNORED here.
default_conf = {
    "data": OPEN,  # validated by the dataset class named in data.dataset
    "front_end_model": IGNORED,  # the reference's trainer class; there is one trainer here
    "model": combine(extractor.default_conf, {
        "detector_loss": {"loss_type": "softmax"},
        "batch_size": 64,  # global: divided among the processes of a torchrun
        "eval_batch_size": 16,
        "learning_rate": 0.001,
        "lambda_loss": 0,  # weight of the descriptor loss; 0 trains the detector only
        "dense_loss": {"enable": False, "params": OPEN},
        "sparse_loss": {"enable": False, "params": OPEN},
        "kernel_reg": IGNORED,
        "lambda_res": IGNORED,
        "other_settings": IGNORED,
    }),
    "training": {
        "workers_train": 1,
        "workers_val": 1,
        "workers_test": IGNORED,
        "precision": "fp32",  # fp32 | bf16 | fp16 | auto (utils.precision)
        "channels_last": "auto",  # true | false | auto (utils.precision.use_channels_last)
        "threads": "auto",  # CPU threads per process: N | auto (utils.precision.set_threads)
        "nan_patience": 10,  # consecutive non-finite losses that stop the run
        # A loss above factor x the median of the last `window` good losses for `patience` consecutive
        # iterations stops the run as diverged (DivergenceMonitor).
        "divergence": {"factor": 10.0, "patience": 5, "window": 50},
        "max_bad_fraction": 0.1,  # unreadable training items (distinct) tolerated, as a share of the set
        # Step schedule: the learning rate is multiplied by lr_decay at each iteration listed (none: constant).
        "lr_milestones": [],
        "lr_decay": 0.1,
    },
    "pretrained": None,
    "retrain": True,  # true: new network; false: load `pretrained`
    "reset_iter": True,  # with retrain false: restart the iteration count at 0
    "train_iter": 170000,
    "tensorboard_interval": 200,
    "save_interval": 2000,
    "validation_interval": 200,
    "validation_size": 3,  # validation batches of model.eval_batch_size
    "train_show_interval": IGNORED,
    "eval_iter": IGNORED,
    "seed": 0,
}


def check_training_conf(conf: Mapping, source: str = "config") -> dict:
    """`conf` (merged over `default_conf`) with its values checked, numeric strings turned into numbers
    (utils.config checks); a bad value is a ConfigError naming the file and the key."""
    model, training = dict(conf["model"]), dict(conf["training"])
    top = {key: check_int(conf[key], key, source, minimum=0 if key == "train_iter" else 1)
           for key in ("train_iter", "save_interval", "validation_interval", "tensorboard_interval",
                       "validation_size")}
    for key in ("batch_size", "eval_batch_size"):
        model[key] = check_int(model[key], f"model.{key}", source, minimum=1, example=16)
    model["learning_rate"] = check_positive(model["learning_rate"], "model.learning_rate", source, example=0.001)
    for key in ("workers_train", "workers_val"):
        training[key] = check_int(training[key], f"training.{key}", source, minimum=0)
    check_choice(training["precision"], precision_lib.PRECISIONS, "training.precision", source)
    check_choice(training["channels_last"], (True, False, "auto"), "training.channels_last", source)
    training["nan_patience"] = check_int(training["nan_patience"], "training.nan_patience", source, minimum=1)
    divergence = dict(training["divergence"])
    divergence["factor"] = check_number(divergence["factor"], "training.divergence.factor", source, 1, open_low=True,
                                        example=10)
    for key, example in (("patience", 5), ("window", 50)):
        divergence[key] = check_int(divergence[key], f"training.divergence.{key}", source, minimum=1, example=example)
    training["divergence"] = divergence
    training["max_bad_fraction"] = check_number(training["max_bad_fraction"], "training.max_bad_fraction", source,
                                                0, 1, example=0.1)
    training["lr_milestones"] = check_list(training["lr_milestones"], "training.lr_milestones", source,
                                           item=partial(check_int, minimum=1), example="[20000]")
    training["lr_decay"] = check_number(training["lr_decay"], "training.lr_decay", source, 0, 1, open_low=True,
                                        example=0.1)
    require(conf, "data.dataset", source)
    return {**conf, **top, "model": model, "training": training}


# Keys a resumed run may change (utils.runs): the budget, the learning rate and its schedule, intervals,
# workers and speed settings. Anything else would make the checkpoints the product of two configurations.
RESUMABLE_KEYS = ("train_iter", "model.learning_rate", "model.eval_batch_size", "training.lr_milestones",
                  "training.lr_decay", "save_interval", "validation_interval", "validation_size",
                  "tensorboard_interval", "training.workers_train", "training.workers_val", "training.workers_test",
                  "training.precision", "training.channels_last", "training.threads", "training.nan_patience",
                  "training.divergence", "training.max_bad_fraction")
OUTPUTS = ("checkpoints/*", "metrics.jsonl")  # what makes an experiment folder used (and --overwrite removes)
