"""The Trainer behind `train4.py train_base` and `train4.py train_joint` (entry: pipeline.training_run):
the training loop. Settings in pipeline.training_settings, data in pipeline.training_data, the network
call in utils.backends, metrics in utils.metrics, divergence in utils.divergence, processes and devices
in utils.distributed, checkpoint names and discovery in utils.checkpoints.

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
counted; a divergence (utils.divergence) stops the run. The checkpoint of iteration n holds the state
after n iterations. It is written at every multiple of `save_interval`, at the end, on Ctrl-C or
SIGTERM. Resuming from it (`retrain: false`, `pretrained: <checkpoint>`, `reset_iter: false`, or the
same command with `--resume`) restores the model, the optimizer and n, and goes on with the batches an
uninterrupted run would have seen (pipeline.training_data).

Validation (with --eval) every `validation_interval` iterations and at the end, in eval mode, over the
first `validation_size` batches of the validation set (the same batches every time): the losses,
precision, recall and mAP against `labels_2D` and, with warped pairs, match_precision and matches
(`utils.metrics.ValidationMetrics`). The descriptor loss's random sampling is seeded with `seed` at
every validation (the same draws each time) and leaves the training random state untouched.

Several processes (torchrun): DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 alone
validates and writes logs, tensorboard, metrics and checkpoints.
"""
from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from tqdm import tqdm

from models import extractor, get_model
from pipeline.training_data import TrainingData, network_input, seed_everything
from pipeline.training_settings import check_training_conf
from utils import precision as precision_lib
from utils import runs
from utils.backends import TorchBackend
from utils.checkpoints import restore_training, save_checkpoint
from utils.cli import signals_as_interrupt
from utils.config import ConfigError
from utils.distributed import default_device, derived_seed, distributed_context, init_process_group
from utils.divergence import DivergenceMonitor
from utils.draw import log_detections
from utils.io import append_jsonl
from utils.keypoints import logits_to_heatmap
from utils.losses import TrainingLoss
from utils.metrics import DetectionMetrics, ValidationMetrics

log = logging.getLogger(__name__)

TENSORBOARD_MAX_IMAGES = 2


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
        self.data = TrainingData(self.conf, self.ctx, self.seed, validate, pin=self.device.type == "cuda",
                                 datasets=datasets, source=source)
        tconf = self.conf["training"]
        self.monitor = DivergenceMonitor(tconf["divergence"], tconf["nan_patience"], self.loss_history)
        self.bad_items = runs.BadItems(len(self.data.train_set), tconf["max_bad_fraction"], "training items")
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
        seed_everything(derived_seed(seed, -1, self.ctx.rank))
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

    # ---------------------------------------------------------------- one step
    def forward(self, images: torch.Tensor, model=None) -> dict:
        """`model` (default: the training module) on (B, 1, H, W) images at the configured precision
        (utils.backends); outputs in fp32."""
        return self.backend(images, model or self.model)

    def compute_losses(self, out: Mapping, batch: Mapping) -> dict:
        """Loss terms of a batch from the fp32 network outputs (utils.losses.TrainingLoss)."""
        return self.loss(out, batch, soft_labels=self.data.gaussian)

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
        out = self.forward(network_input(batch))
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
                for batch in islice(self.data.val_loader, self.conf["validation_size"]):
                    self._report_bad_items(batch)
                    if "image" not in batch:
                        continue
                    out = self.forward(network_input(batch), model=self.net)
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
                 self.concrete_precision, self.channels_last, self.device, self.ctx.world_size, self.data.per_rank_batch)
        start_time, data_time = time.perf_counter(), 0.0
        validated_at = saved_at = None
        progress = tqdm(total=train_iter, initial=self.n_iter, disable=not self.ctx.is_main, dynamic_ncols=True,
                        desc="train", unit="it")
        batches = self.data.batches(self.n_iter)
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
        """One training step and its bookkeeping; raises utils.divergence.TrainingDiverged when the monitor says so."""
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
            raise self.monitor.stop(self.n_iter, self.checkpoint_dir if self.ctx.is_main else None)

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
