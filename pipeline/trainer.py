"""The trainer behind `train4.py train_base` and `train4.py train_joint`: the training loop and its
orchestration. Metrics live in utils.metrics, processes and devices in utils.distributed, the network
call in utils.backends, checkpoint names and discovery in utils.checkpoints.

The reference trained the same way (image and warped pair, detector loss on both, the descriptor loss
weighted by `lambda_loss`, Adam, checkpoints in its format: utils.checkpoints), but validated with
the network in train mode (BatchNorm batch statistics), dropped the optimizer state on resume, ran
train_iter + 1 steps, ignored its seeds, and its --eval flag did nothing; this trainer fixes those, and
offers the paper's `cross_entropy` detector loss beside the reference's BCE on the softmax.

One step: the image and its warped pair (when the samples have one) go through the network as one
batch (so BatchNorm sees both, and DDP sees one forward pass), at the configured precision; the losses
are computed in fp32 from the raw outputs: `loss = loss_det + loss_det_warp + lambda_loss * loss_desc`
(`utils.losses.TrainingLoss`; MagicPoint has no descriptor term). Adam, with a step learning-rate
schedule (`training.lr_milestones`, `training.lr_decay`; none: constant).

Iterations. `n_iter` counts the batches consumed; training stops after exactly `train_iter` of them.
A batch whose loss is NaN or inf is skipped (no optimizer step, BatchNorm statistics restored) and
counted; `training.nan_patience` consecutive skips save a checkpoint and stop the run. The checkpoint
of iteration n holds the state after n iterations. It is written at every multiple of `save_interval`,
at the end, on Ctrl-C or SIGTERM, and when the run stops on NaNs.
Resuming from it (`retrain: false`, `pretrained: <checkpoint>`, `reset_iter: false`, or the same
command with `--resume`, e.g. after a `kill -9`) restores the model, the optimizer and n, and goes on
with the batches an uninterrupted run would have seen: epoch e visits the dataset in the order of
`DistributedSampler(seed, epoch=e)`, DataLoader workers are seeded from (seed, epoch, rank), and a
dataset with a `set_epoch(epoch)` method is told the epoch (whether its augmentations then repeat
exactly is up to its seeding; SyntheticDataset_gaussian's do).

Validation (with --eval) every `validation_interval` iterations and at the end, in eval mode, over the
first `validation_size` batches of the validation set (the same batches every time): the losses,
precision, recall and mAP against `labels_2D` and, with warped pairs, match_precision and matches
(`utils.metrics.ValidationMetrics`). The descriptor loss's random sampling is
seeded with `seed` at every validation (the same draws each time) and leaves the training random state
untouched.

Several processes (torchrun): DistributedDataParallel (NCCL on GPUs, gloo on CPU); each rank trains on
its share of every epoch with `model.batch_size / WORLD_SIZE` samples per step, so the global batch is
the configured one; rank 0 alone validates and writes logs, tensorboard, metrics and checkpoints.

Outputs: EXPER_PATH/<exper>/config.yml (the merged config), checkpoints/, metrics.jsonl (one JSON
object per validation: iteration, precision, recall, mAP and the losses) and tensorboard events in
runs/<task>/<exper>_<date>.
"""
from __future__ import annotations

import inspect
import json
import logging
import random
import statistics
import time
from collections import deque
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

import settings
from datasets import get_dataset_class
from datasets.data_tools import SkipBadItems, collate_skipping_bad
from models import extractor, get_model
from utils import precision as precision_lib
from utils.backends import TorchBackend
from utils import runs
from utils.checkpoints import (checkpoints_by_iteration, latest_checkpoint, latest_loadable_checkpoint,
                               restore_training, save_checkpoint)
from utils.cli import signals_as_interrupt, tensorboard_dir
from utils.config import (IGNORED, OPEN, ConfigError, check_choice, check_int, check_list, check_number,
                          check_positive, combine, dump_config, load_config, require)
from utils.distributed import (ResumableSampler, default_device, derived_seed,
                               distributed_context, init_process_group)
from utils.draw import log_detections
from utils.io import append_jsonl, write_text
from utils.keypoints import logits_to_heatmap
from utils.losses import TrainingLoss
from utils.metrics import DetectionMetrics, ValidationMetrics

log = logging.getLogger(__name__)

TENSORBOARD_MAX_IMAGES = 2

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


class TrainingDiverged(RuntimeError):
    """The loss diverged (see DivergenceMonitor); the message says where to resume from."""


HISTORY_SHOWN = 12  # (iteration, loss) pairs quoted when a run diverges


class DivergenceMonitor:
    """Watches the loss of every iteration for divergence.

    A step is bad when its loss or its gradients are not finite, or when its loss exceeds `factor` x the
    median of the last `window` good losses (from the second iteration on: a learning rate far too high
    spoils the very first steps, and a median over them would hide it). A run of consecutive bad
    steps is a divergence after `patience` of them, or `nan_patience` when all were non-finite (a
    non-finite step is skipped without harm, e.g. one bad batch, so more are tolerated). `onset` is the
    first bad iteration: its loss came from the weights after iteration onset - 1, so those weights and
    all later ones are suspect. `good` is saved in checkpoints, so a resumed run keeps watching.
    """

    def __init__(self, conf: Mapping, nan_patience: int, history=()):
        self.factor, self.patience = conf["factor"], conf["patience"]
        self.nan_patience = nan_patience
        self.good = deque((float(x) for x in history), maxlen=conf["window"])
        self.recent: deque = deque(maxlen=HISTORY_SHOWN)
        self.onset, self.bad, self.exploded = None, 0, False

    def update(self, n_iter: int, loss: float, finite: bool) -> bool:
        """Record iteration `n_iter` (its loss, whether loss and gradients were finite); True: diverged."""
        self.recent.append((n_iter, loss))
        exploded = finite and bool(self.good) and loss > self.factor * statistics.median(self.good)
        if finite and not exploded:
            self.good.append(loss)
            self.onset, self.bad, self.exploded = None, 0, False
            return False
        self.onset = n_iter if self.bad == 0 else self.onset
        self.bad += 1
        self.exploded |= exploded
        return self.bad >= (self.patience if self.exploded else self.nan_patience)

    def describe(self) -> str:
        kind = (f"more than {self.factor:g} x its running median {statistics.median(self.good):.4g}" if self.exploded
                else "NaN/inf (loss or gradients)")
        history = ", ".join(f"{i}: {loss:.4g}" for i, loss in self.recent)
        return (f"the loss was {kind} for {self.bad} consecutive iterations from iteration {self.onset} on "
                f"(iteration: loss {history})")


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------

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


class Trainer:
    """Training of one configuration (see the module docstring).

    conf: a config merged over `default_conf`; its values are checked here (`check_training_conf`).
    exper_dir: EXPER_PATH/<exper>. runs_dir: the tensorboard folder (None: no tensorboard). validate:
    the --eval flag. device: default `utils.distributed.default_device`. datasets: optional (train, val)
    datasets instead of building them from `data.dataset`.

    `net` is the network (what checkpoints hold and validation runs); `model` is what the training
    step calls: `net` itself in one process, its DistributedDataParallel wrapper under torchrun.
    """

    def __init__(self, conf: Mapping, exper_dir: str | Path, runs_dir: str | Path | None = None,
                 validate: bool = False, device: torch.device | str | None = None, datasets=None,
                 source: str = "config"):
        self.conf, self.source = check_training_conf(conf, source), source
        self.ctx = distributed_context()
        self.exper_dir = Path(exper_dir)
        self.checkpoint_dir = self.exper_dir / "checkpoints"
        self.validate_enabled = validate
        init_process_group(self.ctx)
        self.device = self._select_device(device)
        self.seed = self._seed()
        self._build_network()
        self.n_iter = self._restore()
        self.model = self._wrap_for_processes()
        self._build_data(datasets)
        tconf = self.conf["training"]
        self.monitor = DivergenceMonitor(tconf["divergence"], tconf["nan_patience"], self.loss_history)
        self.bad_items = runs.BadItems(len(self.train_set), tconf["max_bad_fraction"], "training items")
        self.writer = SummaryWriter(str(runs_dir)) if runs_dir is not None and self.ctx.is_main else None
        self.last_loss: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- set-up
    def _select_device(self, device) -> torch.device:
        device = torch.device(device) if device is not None else default_device(self.ctx)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _seed(self) -> int:
        """The run's seed (`seed`, or one from the clock when null); seeds this process's generators."""
        seed = self.conf["seed"] if self.conf["seed"] is not None else int(time.time()) % 2 ** 31
        self._seed_everything(derived_seed(seed, -1, self.ctx.rank))
        return seed

    def _build_network(self) -> None:
        """The network at the configured precision and layout, its optimizer, scaler and losses."""
        mconf, tconf = self.conf["model"], self.conf["training"]
        net = get_model(mconf["name"], mconf["params"])
        try:
            self.backend = TorchBackend(net, self.device, tconf["precision"], tconf["channels_last"])
        except ValueError as e:
            raise ConfigError(f"{self.source}: training.precision: {e}") from e
        self.net = self.backend.net
        try:
            precision_lib.set_threads(tconf["threads"], workers=tconf["workers_train"], key="training.threads")
        except ValueError as e:
            raise ConfigError(f"{self.source}: {e}") from e
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=mconf["learning_rate"])
        self.scaler = precision_lib.grad_scaler(tconf["precision"], self.device)
        self.loss = TrainingLoss(mconf, self.source)

    @property
    def concrete_precision(self) -> str:
        return self.backend.concrete_precision

    @property
    def channels_last(self) -> bool:
        return self.backend.channels_last

    def _wrap_for_processes(self) -> torch.nn.Module:
        """`net`, or its DistributedDataParallel wrapper under torchrun."""
        if not self.ctx.enabled:
            return self.net
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Without a descriptor loss the descriptor head gets no gradient.
        return torch.nn.parallel.DistributedDataParallel(
            self.net, device_ids=ids, find_unused_parameters=self.loss.descriptor_loss is None)

    def _build_data(self, datasets) -> None:
        """Datasets, the resumable training sampler and the loaders."""
        mconf, tconf = self.conf["model"], self.conf["training"]
        self.per_rank_batch = self._per_rank_batch(mconf["batch_size"])
        self.train_set, self.val_set = datasets if datasets is not None else self._build_datasets()
        data_conf = getattr(self.train_set, "conf", self.conf["data"]) or {}
        self.gaussian = bool((data_conf.get("gaussian_label") or {}).get("enable"))
        self.train_sampler = ResumableSampler(self.train_set, self.ctx, shuffle=True, seed=self.seed)
        self.steps_per_epoch = len(self.train_sampler) // self.per_rank_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.source}: the training set has {len(self.train_set)} samples, fewer than "
                              f"one batch of model.batch_size {mconf['batch_size']}")
        self.loader_generator = torch.Generator()
        pin = self.device.type == "cuda"
        # Unreadable items are left out of their batch and reported (collate_skipping_bad), never fatal alone.
        self.train_loader = DataLoader(SkipBadItems(self.train_set), batch_size=self.per_rank_batch,
                                       sampler=self.train_sampler, num_workers=tconf["workers_train"], drop_last=True,
                                       pin_memory=pin, generator=self.loader_generator,
                                       collate_fn=collate_skipping_bad)
        self.val_loader = None
        if self.validate_enabled and self.ctx.is_main:
            workers = tconf["workers_val"]
            self.val_loader = DataLoader(SkipBadItems(self.val_set), batch_size=mconf["eval_batch_size"],
                                         shuffle=False, num_workers=workers, pin_memory=pin,
                                         persistent_workers=workers > 0, collate_fn=collate_skipping_bad)

    def _per_rank_batch(self, batch_size: int) -> int:
        if batch_size % self.ctx.world_size:
            raise ConfigError(f"{self.source}: model.batch_size {batch_size} is not divisible by the "
                              f"{self.ctx.world_size} processes (WORLD_SIZE)")
        return batch_size // self.ctx.world_size

    def _build_datasets(self):
        cls = get_dataset_class(self.conf["data"]["dataset"])
        # Rank 0 first, so that a dataset that builds a disk cache does it once.
        if self.ctx.enabled and not self.ctx.is_main:
            dist.barrier()
        # Errors in the data section name the config file (datasets that take a `source`).
        named = {"source": f"{self.source}, data"} if "source" in inspect.signature(cls).parameters else {}
        train = cls(self.conf["data"], task="train", seed=self.seed, **named)
        val = (cls(self.conf["data"], task="val", seed=self.seed, **named)
               if self.validate_enabled and self.ctx.is_main else None)
        if self.ctx.enabled and self.ctx.is_main:
            dist.barrier()
        return train, val

    def _restore(self) -> int:
        """Load `pretrained` when `retrain` is false; returns the iteration to start from."""
        self.nan_skipped, self.loss_history = 0, []  # (the divergence monitor's good losses, on resume)
        path = extractor.weights_path(self.conf)
        if self.conf["retrain"]:
            if path:
                log.warning("retrain is true: ignoring pretrained %s (set retrain: false to load it)", path)
            return 0
        if not path:
            raise ConfigError(f"{self.source}: retrain is false but no 'pretrained' checkpoint is given")
        state = restore_training(path, self.net, self.optimizer, self.scaler)
        if self.conf["reset_iter"]:
            return 0
        self.nan_skipped, self.loss_history = state["nan_skipped"], state["loss_history"]
        return state["n_iter"]

    def _seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ---------------------------------------------------------------- one step
    def forward(self, images: torch.Tensor, model=None) -> dict:
        """`model` (default: the training module) on (B, 1, H, W) images at the configured precision
        (utils.backends); outputs in fp32."""
        return self.backend(images, model or self.model)

    def compute_losses(self, out: Mapping, batch: Mapping) -> dict:
        """Loss terms of a batch from the fp32 network outputs (utils.losses.TrainingLoss)."""
        return self.loss(out, batch, soft_labels=self.gaussian)

    def learning_rate(self, n_iter: int) -> float:
        """The learning rate of iteration `n_iter` (0-based): model.learning_rate times training.lr_decay
        for every milestone already reached. A function of the iteration alone, so a resumed run follows it."""
        tconf = self.conf["training"]
        reached = sum(n_iter >= m for m in tconf["lr_milestones"])
        return float(self.conf["model"]["learning_rate"]) * float(tconf["lr_decay"]) ** reached

    def train_step(self, batch: Mapping) -> tuple[dict, dict, bool]:
        """One training iteration. Returns (losses (detached), network outputs, whether a step was taken)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.n_iter)
        buffers = [b.detach().clone() for b in self.net.buffers()]
        out = self.forward(_network_input(batch))
        losses = self.compute_losses(out, batch)
        loss = losses["loss"]
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.ctx.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = bool(finite)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP needs the backward pass on every rank to complete its reduction, even for a bad step.
        if finite or self.ctx.enabled:
            self.scaler.scale(loss).backward()
        if finite and not self.scaler.is_enabled():  # (a grad scaler skips non-finite gradients itself)
            finite = self._gradients_finite()
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # the forward pass fed the NaNs into the BatchNorm statistics
                for saved, buf in zip(buffers, self.net.buffers()):
                    buf.copy_(saved)
        return {k: v.detach() for k, v in losses.items()}, out, finite

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (the same on every rank: DDP has averaged them)."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        """Losses, detection and matching metrics (utils.metrics.ValidationMetrics) over the first
        `validation_size` validation batches, in eval mode."""
        self.net.eval()
        metrics, first = ValidationMetrics(), None
        try:
            # The same descriptor-loss draws at every validation; the training random state is kept.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for batch in islice(self.val_loader, self.conf["validation_size"]):
                    self._report_bad_items(batch)
                    if "image" not in batch:
                        continue
                    out = self.forward(_network_input(batch), model=self.net)
                    heatmap, predictions = metrics.update(out, batch, self.compute_losses(out, batch))
                    if first is None:
                        k = TENSORBOARD_MAX_IMAGES
                        first = (batch["image"][:k], batch["labels_2D"][:k], predictions[:k], heatmap[:k])
        finally:
            self.net.train()
        if metrics.batches == 0:
            raise ConfigError(f"{self.source}: the validation set is empty")
        result = metrics.compute()
        if self.writer is not None:
            for key, value in result.items():
                self.writer.add_scalar(f"val-{key}", value, self.n_iter)
            log_detections(self.writer, "val", self.n_iter, *first)
        return result

    def _log_train(self, losses: dict, out: dict, batch: Mapping) -> None:
        if self.writer is None:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f"train-{key}", float(value), self.n_iter)
        if self.n_iter % self.conf["tensorboard_interval"] == 0:
            b, k = batch["image"].shape[0], TENSORBOARD_MAX_IMAGES
            metrics = DetectionMetrics()
            heatmap = logits_to_heatmap(out["semi"][:b].detach())
            predictions = metrics.update(heatmap, batch["labels_2D"], batch.get("valid_mask"))
            scores = metrics.compute()
            self.writer.add_scalar("train-precision", scores["precision"], self.n_iter)
            self.writer.add_scalar("train-recall", scores["recall"], self.n_iter)
            log_detections(self.writer, "train", self.n_iter, batch["image"][:k], batch["labels_2D"][:k],
                           predictions[:k], heatmap[:k])

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Optional[Path]:
        """Checkpoint of the current state (rank 0 only; other ranks return None)."""
        if not self.ctx.is_main:
            return None
        extra = {"nan_skipped": self.nan_skipped, "loss_history": list(self.monitor.good)}
        if self.scaler.is_enabled():
            extra["scaler_state_dict"] = self.scaler.state_dict()
        path = save_checkpoint(self.checkpoint_dir, self.n_iter, self.net, self.optimizer, self.last_loss, extra)
        log.debug("saved %s", path)
        return path

    # ---------------------------------------------------------------- the loop
    def _batches(self) -> Iterator[Mapping]:
        """Training batches from iteration `n_iter` on, epoch after epoch."""
        epoch, offset = divmod(self.n_iter, self.steps_per_epoch)
        while True:
            self.train_sampler.set_position(epoch, offset * self.per_rank_batch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            epoch_seed = derived_seed(self.seed, epoch, self.ctx.rank)
            self.loader_generator.manual_seed(epoch_seed)  # DataLoader worker seeds
            self._seed_everything(epoch_seed)  # data loading in this process (workers_train: 0)
            yield from self.train_loader
            epoch, offset = epoch + 1, 0

    def run(self) -> dict:
        """Train until `train_iter` iterations; returns a summary (iterations, skipped, validation, ...)."""
        c = self.conf
        train_iter = c["train_iter"]
        summary = {"start_iteration": self.n_iter, "validation": None, "checkpoint": None}
        if self.n_iter >= train_iter:
            log.info("nothing to do: the run is at iteration %d and train_iter is %d", self.n_iter, train_iter)
            return {**summary, "iterations": self.n_iter, "nan_skipped": 0, "seconds": 0.0, "bad_items": 0}
        log.info("training %s from iteration %d to %d: %s precision, channels_last %s, device %s, "
                 "%d process(es), batch %d per process", c["model"]["name"], self.n_iter, train_iter,
                 self.concrete_precision, self.channels_last, self.device, self.ctx.world_size, self.per_rank_batch)
        start_time, data_time = time.perf_counter(), 0.0
        validated_at = saved_at = None
        progress = tqdm(total=train_iter, initial=self.n_iter, disable=not self.ctx.is_main, dynamic_ncols=True,
                        desc="train", unit="it")
        batches = self._batches()
        try:
            with signals_as_interrupt():  # SIGTERM too: a scheduler's `kill` saves a checkpoint
                while self.n_iter < train_iter:
                    t0 = time.perf_counter()
                    batch = self._next_batch(batches)
                    data_time += time.perf_counter() - t0
                    self._iteration(batch, progress)
                    if self.validate_enabled and self.n_iter % c["validation_interval"] == 0:
                        summary["validation"], validated_at = self._validate_and_record(), self.n_iter
                    if self.n_iter % c["save_interval"] == 0:
                        summary["checkpoint"], saved_at = self.save(), self.n_iter
        except (KeyboardInterrupt, runs.TooManyBadItems) as e:
            path = self.save()
            if path is not None:
                log.warning("%s at iteration %d; checkpoint saved to %s", "stopped" if isinstance(
                    e, runs.TooManyBadItems) else "interrupted", self.n_iter, path)
            raise
        finally:
            progress.close()
            batches.close()
        if saved_at != self.n_iter:
            summary["checkpoint"] = self.save()
        if self.validate_enabled and validated_at != self.n_iter:
            summary["validation"] = self._validate_and_record()
        seconds = time.perf_counter() - start_time
        done = self.n_iter - summary["start_iteration"]
        log.info("%d iterations in %.1f s (%.2f it/s, %.0f%% of it waiting for data); %d skipped (NaN/inf), "
                 "%d unreadable item(s)", done, seconds, done / max(seconds, 1e-9),
                 100 * data_time / max(seconds, 1e-9), self.nan_skipped, len(self.bad_items))
        if self.writer is not None:
            self.writer.flush()
        return {**summary, "iterations": self.n_iter, "nan_skipped": self.nan_skipped, "seconds": seconds,
                "data_seconds": data_time, "bad_items": len(self.bad_items)}

    def _next_batch(self, batches: Iterator[Mapping]) -> Mapping:
        """The next batch with at least one readable sample; unreadable ones are reported and counted
        (runs.TooManyBadItems past training.max_bad_fraction of the training set)."""
        while True:
            batch = next(batches)
            self._report_bad_items(batch)
            if "image" in batch:
                return batch

    def _report_bad_items(self, batch: dict) -> None:
        for name, error in batch.pop("bad_items", []):
            self.bad_items.add(name, error)

    def _iteration(self, batch: Mapping, progress) -> None:
        """One training step and its bookkeeping; raises TrainingDiverged when the monitor says so."""
        # The descriptor loss's random draws depend on the iteration alone: a resumed run repeats them.
        torch.manual_seed(derived_seed(self.seed, -2, self.n_iter, self.ctx.rank))
        losses, out, stepped = self.train_step(batch)
        self.n_iter += 1
        progress.update(1)
        loss = losses["loss"].detach().clone()
        if self.ctx.enabled:  # every rank watches the same (mean) loss, so all stop together
            dist.all_reduce(loss)
            loss /= self.ctx.world_size
        loss = float(loss)
        if stepped:
            self.last_loss = losses["loss"]
            self._log_train(losses, out, batch)
            if self.n_iter % 10 == 0 or self.n_iter == self.conf["train_iter"]:
                progress.set_postfix(loss=f"{loss:.4f}")
        else:
            self.nan_skipped += 1
            log.warning("iteration %d: non-finite loss or gradients (%s); step skipped", self.n_iter,
                        ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
        if self.monitor.update(self.n_iter, loss, stepped):
            raise self._diverged()

    def _diverged(self) -> TrainingDiverged:
        """Set the checkpoints saved since the divergence began aside (`*.diverged`), so that the last one
        before it is what --resume continues from; returns the error that stops the run."""
        kept = None
        if self.ctx.is_main:
            for n, path in checkpoints_by_iteration(self.checkpoint_dir):
                if n >= self.monitor.onset - 1:
                    path.rename(path.with_name(path.name + ".diverged"))
            kept = latest_checkpoint(self.checkpoint_dir)
        advice = (f"the last checkpoint before it, {kept}, is the one --resume continues from: lower "
                  f"model.learning_rate (or fix the data) and rerun the command with --resume" if kept else
                  "no checkpoint was saved before it: lower model.learning_rate (or fix the data) and start "
                  "again with --overwrite")
        return TrainingDiverged(f"training diverged at iteration {self.n_iter}: {self.monitor.describe()}; {advice}")

    def _validate_and_record(self) -> Optional[dict]:
        if not self.ctx.is_main:
            return None
        result = self.validate()
        row = {"iteration": self.n_iter, **{k: float(v) for k, v in result.items()}}
        append_jsonl(self.exper_dir / "metrics.jsonl", row)
        log.info("validation at %d: precision %.3f, recall %.3f, mAP %.3f, loss %.4f", self.n_iter,
                 result["precision"], result["recall"], result["mAP"], result["loss"])
        return result

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------------------------------
# Entry point of train4.py
# --------------------------------------------------------------------------------------------------

def _network_input(batch: Mapping) -> torch.Tensor:
    """The images of a batch as one network input: `image`, then `warped_img` when the samples have one."""
    if "warped_img" in batch:
        return torch.cat([batch["image"], batch["warped_img"]])
    return batch["image"]


# Keys a resumed run may change (utils.runs): the budget, the learning rate and its schedule, intervals,
# workers and speed settings. Anything else would make the checkpoints the product of two configurations.
RESUMABLE_KEYS = ("train_iter", "model.learning_rate", "model.eval_batch_size", "training.lr_milestones",
                  "training.lr_decay", "save_interval", "validation_interval", "validation_size",
                  "tensorboard_interval", "training.workers_train", "training.workers_val", "training.workers_test",
                  "training.precision", "training.channels_last", "training.threads", "training.nan_patience",
                  "training.divergence", "training.max_bad_fraction")
OUTPUTS = ("checkpoints/*", "metrics.jsonl")  # what makes an experiment folder used (and --overwrite removes)


def add_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in EXPER_PATH/<exper_name>/checkpoints (model, "
                             "optimizer and iteration); only with the recorded configuration, except the budget, "
                             "learning rate, intervals and workers")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the experiment's checkpoints and metrics, then train from the start")


def run(args) -> dict:
    """`train4.py <task> <config> <exper_name> [--eval] [--resume | --overwrite]`."""
    conf = load_config(args.config, default_conf)
    return train(conf, args.exper_name, args.task, validate=args.eval, resume=args.resume,
                 overwrite=getattr(args, "overwrite", False), source=args.config)


def train(conf: dict, exper_name: str, task: str, validate: bool = False, resume: bool = False,
          overwrite: bool = False, exper_root: str | Path | None = None, runs_root: str | Path = "runs",
          source: str = "config") -> dict:
    """Run a training task for a config merged over `default_conf`; outputs under exper_root/exper_name.

    A folder holding another run's checkpoints is refused unless `resume` (same configuration, except
    RESUMABLE_KEYS) or `overwrite` (utils.runs); the folder's run.json records the run."""
    exper_dir = Path(exper_root if exper_root is not None else settings.EXPER_PATH) / exper_name
    ctx = distributed_context()
    conf = check_training_conf(conf, source)
    record = runs.make_record(task, conf, None if conf["retrain"] else extractor.weights_path(conf))
    plan = runs.plan_run(exper_dir, record, OUTPUTS, resume=resume, overwrite=overwrite, may_change=RESUMABLE_KEYS)
    if plan.mode == "resume":
        conf = _from_latest_checkpoint(conf, exper_dir)
    elif resume:
        log.warning("--resume: %s holds no earlier run; starting from scratch", exper_dir)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    runs_dir = tensorboard_dir(runs_root, task, exper_name) if ctx.is_main else None
    trainer = Trainer(conf, exper_dir, runs_dir=runs_dir, validate=validate, source=source)
    applied = False
    try:
        if ctx.is_main:
            plan.apply()  # after the settings and data were checked: a refused run leaves the folder as it was
            applied = True
            _drop_metrics_after(exper_dir / "metrics.jsonl", trainer.n_iter)
            merged = {**trainer.conf, "data": getattr(trainer.train_set, "conf", conf["data"])}
            dump_config(exper_dir / "config.yml", merged)
            log.info("experiment folder %s; tensorboard %s", exper_dir, runs_dir)
        return trainer.run()
    finally:
        if applied and trainer.bad_items.items:
            plan.update(bad_items=trainer.bad_items.as_record())
        trainer.close()
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _from_latest_checkpoint(conf: dict, exper_dir: Path) -> dict:
    """`conf` set to resume from the experiment's latest readable checkpoint (unchanged when none)."""
    found = latest_loadable_checkpoint(exper_dir / "checkpoints")
    if found is None:
        log.warning("--resume: no readable checkpoint in %s; starting from scratch", exper_dir / "checkpoints")
        return conf
    return {**conf, "retrain": False, "reset_iter": False, "pretrained": str(found),
            "model": {**conf["model"], "pretrained": None}}


def _drop_metrics_after(path: Path, n_iter: int) -> None:
    """Remove the metrics.jsonl rows of iterations after `n_iter` (and a line cut short): a run killed
    after validating but before its next checkpoint resumes before them and writes them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _row_iteration(line) <= n_iter]
    if len(kept) != len(lines):
        log.info("%s: dropped %d row(s) after iteration %d (the resumed run repeats them)", path,
                 len(lines) - len(kept), n_iter)
        write_text(path, "".join(line + "\n" for line in kept))


def _row_iteration(line: str) -> float:
    try:
        return float(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
