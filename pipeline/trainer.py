"""The trainer behind `train4.py train_base` and `train4.py train_joint` (reference-spec 5.1-5.2, with
the fixes of section 0 rows 1, 2, 9 and 12).

One step: the image and its warped pair (when the samples have one) go through the network as one
batch (so BatchNorm sees both, and DDP sees one forward pass), at the configured precision; the losses
are computed in fp32 from the raw outputs: `loss = loss_det + loss_det_warp + lambda_loss * loss_desc`
(the descriptor term comes from `utils.losses.get_descriptor_loss`; MagicPoint has none). Adam,
constant learning rate.

Iterations. `n_iter` counts the batches consumed; training stops after exactly `train_iter` of them.
A batch whose loss is NaN or inf is skipped (no optimizer step, BatchNorm statistics restored) and
counted; `training.nan_patience` consecutive skips save a checkpoint and stop the run.
Checkpoint `superPointNet_<n>_checkpoint.pth.tar` holds the state after n iterations. It is written
at every multiple of `save_interval`, at the end, on Ctrl-C or SIGTERM, and when the run stops on NaNs.
Resuming from it (`retrain: false`, `pretrained: <checkpoint>`, `reset_iter: false`, or the same
command with `--resume`, e.g. after a `kill -9`) restores the model, the optimizer and n, and goes on
with the batches an uninterrupted run would have seen: epoch e visits the dataset in the order of
`DistributedSampler(seed, epoch=e)`, DataLoader workers are seeded from (seed, epoch, rank), and a
dataset with a `set_epoch(epoch)` method is told the epoch (whether its augmentations then repeat
exactly is up to its seeding; SyntheticDataset_gaussian's do).

Validation (with --eval) every `validation_interval` iterations and at the end, in eval mode, over the
first `validation_size` batches of the validation set (the same batches every time). Detection
metrics (`DetectionMetrics`): predictions are the NMS'd heatmap maxima (radius 4, score >= 0.015,
4-pixel border removed, as the extractor); labels are the `labels_2D` pixels outside that border (and
inside the valid mask). Matching is greedy one-to-one by decreasing score: a prediction is correct when
a label not taken by a higher-scoring prediction lies within 3 px. precision = correct / predictions,
recall = correct / labels, over the whole validation. mAP ranks every NMS'd maximum with score >= 0.001
and is the area under that precision-recall curve with recall relative to all labels. With warped
pairs, a descriptor metric (`MatchingMetrics`): the `EVAL_MATCH_TOP_K` best predictions of the image
and of the warped image, their descriptors, mutual nearest neighbours; `match_precision` is the share
of those matches whose image point, moved by the pair's homography, lies within 3 px of its match, and
`matches` the mean number of matches per pair. The descriptor loss's random sampling is seeded with
`seed` at every validation (the same draws each time) and leaves the training random state untouched.

Several processes (torchrun): DistributedDataParallel (NCCL on GPUs, gloo on CPU); each rank trains on
its share of every epoch with `model.batch_size / WORLD_SIZE` samples per step, so the global batch is
the configured one; rank 0 alone validates and writes logs, tensorboard, metrics and checkpoints.

Outputs: EXPER_PATH/<exper>/config.yml (the merged config), checkpoints/, metrics.jsonl (one JSON
object per validation: iteration, precision, recall, mAP and the losses) and tensorboard events in
runs/<task>/<exper>_<date>.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

import settings
from datasets import get_dataset_class
from datasets.data_tools import labels_to_cell_targets, valid_mask_to_cells
from models import extractor, get_model
from utils import precision as precision_lib
from utils.checkpoints import checkpoint_name, load_weights_into, save_checkpoint
from utils.cli import tensorboard_dir
from utils.config import IGNORED, OPEN, ConfigError, check_choice, combine, load_config
from utils.draw import GREEN, RED, draw_keypoints
from utils.io import append_jsonl, write_text
from utils.geometry import warp_points
from utils.keypoints import extract_keypoints, logits_to_heatmap, sample_descriptors
from utils.losses import DETECTOR_LOSSES, detector_loss, get_descriptor_loss
from utils.matching import mutual_nearest_neighbours
from utils.metrics import average_precision

log = logging.getLogger(__name__)

# Validation / tensorboard detection settings (reference: hard-coded NMS 4 and threshold 0.015).
EVAL_NMS_RADIUS = 4
EVAL_THRESHOLD = 0.015
EVAL_BORDER = 4
EVAL_MATCH_DISTANCE = 3.0
EVAL_MAP_MIN_SCORE = 0.001
EVAL_MATCH_TOP_K = 300  # keypoints per image for the descriptor metric
TENSORBOARD_MAX_IMAGES = 2

# Every top-level and model key of the reference's training configs (reference-spec 2.1, 2.6, 2.7).
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
        "nan_patience": 10,  # consecutive non-finite losses that stop the run
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
    """The loss stayed NaN/inf for `training.nan_patience` consecutive iterations."""


# --------------------------------------------------------------------------------------------------
# Detection metrics
# --------------------------------------------------------------------------------------------------

def match_detections(pred: np.ndarray, gt: np.ndarray, max_distance: float) -> np.ndarray:
    """Greedy one-to-one matching. pred: (N, 2) x, y sorted by decreasing score; gt: (M, 2) x, y.

    Returns (N,) bool: prediction i is correct when the nearest label not taken by a higher-scoring
    prediction lies within `max_distance` (Euclidean, pixels); that label is then taken.
    """
    correct = np.zeros(len(pred), dtype=bool)
    if len(pred) == 0 or len(gt) == 0:
        return correct
    dist = np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=-1)
    taken = np.zeros(len(gt), dtype=bool)
    for i in np.flatnonzero((dist <= max_distance).any(axis=1)):
        d = np.where(taken, np.inf, dist[i])
        j = int(np.argmin(d))
        if d[j] <= max_distance:
            correct[i] = taken[j] = True
    return correct


class DetectionMetrics:
    """Accumulates precision, recall and mAP of keypoint detections against label maps (the matching
    rule is in the module docstring)."""

    def __init__(self, threshold: float = EVAL_THRESHOLD, nms_radius: int = EVAL_NMS_RADIUS,
                 border: int = EVAL_BORDER, max_distance: float = EVAL_MATCH_DISTANCE,
                 map_min_score: float = EVAL_MAP_MIN_SCORE):
        self.threshold, self.nms_radius, self.border = threshold, nms_radius, border
        self.max_distance, self.map_min_score = max_distance, min(map_min_score, threshold)
        self.scores: list = []
        self.correct: list = []
        self.n_labels = 0

    def update(self, heatmap: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> list:
        """heatmap: (B, H, W) probabilities; labels: (B, 1, H, W) binary; valid: (B, 1, H, W) 0/1 or None.

        Returns the B predicted keypoint arrays (N, 2) at the precision/recall threshold.
        """
        heatmap = heatmap.detach().float()
        labels = labels.detach().to(heatmap.device)[:, 0] > 0.5
        if valid is not None:
            inside = valid.detach().to(heatmap.device)[:, 0] > 0.5
            heatmap, labels = heatmap * inside, labels & inside
        h, w = labels.shape[-2:]
        labels[:, :self.border], labels[:, h - self.border:] = False, False
        labels[:, :, :self.border], labels[:, :, w - self.border:] = False, False
        # Greedy NMS visits higher scores first, so the maxima >= threshold are the same at any lower
        # threshold: one NMS serves both precision/recall and the mAP ranking.
        detections = extract_keypoints(heatmap, self.map_min_score, self.nms_radius, border=self.border)
        kept = []
        for (points, scores), lab in zip(detections, labels):
            gt = torch.nonzero(lab).flip(-1).float().cpu().numpy()  # (M, 2) x, y
            points, scores = points.cpu().numpy(), scores.cpu().numpy()
            self.correct.append(match_detections(points, gt, self.max_distance))
            self.scores.append(scores)
            self.n_labels += len(gt)
            kept.append(points[scores >= self.threshold])
        return kept

    def compute(self) -> dict:
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        correct = np.concatenate(self.correct) if self.correct else np.zeros(0, dtype=bool)
        at_threshold = scores >= self.threshold
        n_correct = int(correct[at_threshold].sum())
        n_pred = int(at_threshold.sum())
        # average_precision normalises recall by the positives in the ranking; rescale to all labels.
        ap = average_precision(correct, scores) * correct.sum() / self.n_labels if self.n_labels else 0.0
        return {
            "precision": n_correct / n_pred if n_pred else 0.0,
            "recall": n_correct / self.n_labels if self.n_labels else 0.0,
            "mAP": float(ap),
        }


class MatchingMetrics:
    """Accumulates the descriptor metric of validation pairs (see the module docstring)."""

    def __init__(self, threshold: float = EVAL_THRESHOLD, nms_radius: int = EVAL_NMS_RADIUS, border: int = EVAL_BORDER,
                 top_k: int = EVAL_MATCH_TOP_K, max_distance: float = EVAL_MATCH_DISTANCE):
        self.threshold, self.nms_radius, self.border = threshold, nms_radius, border
        self.top_k, self.max_distance = top_k, max_distance
        self.correct = self.matches = self.pairs = 0

    def update(self, heatmap: torch.Tensor, desc: torch.Tensor, warped_heatmap: torch.Tensor,
               warped_desc: torch.Tensor, homographies: torch.Tensor) -> None:
        """heatmaps: (B, H, W); desc: (B, D, H/8, W/8); homographies: (B, 3, 3) pixel, image -> warped."""
        found = [extract_keypoints(h.detach().float(), self.threshold, self.nms_radius, self.border, self.top_k)
                 for h in (heatmap, warped_heatmap)]
        for b, ((p1, _), (p2, _)) in enumerate(zip(*found)):
            self.pairs += 1
            if len(p1) == 0 or len(p2) == 0:
                continue
            d1 = sample_descriptors(desc[b:b + 1].detach(), p1[None])[0]
            d2 = sample_descriptors(warped_desc[b:b + 1].detach(), p2[None])[0]
            i1, i2, _ = mutual_nearest_neighbours(d1, d2)
            moved = warp_points(p1[i1].double(), homographies[b].to(p1.device, torch.float64))
            self.correct += int(((moved - p2[i2].double()).norm(dim=-1) <= self.max_distance).sum())
            self.matches += len(i1)

    def compute(self) -> dict:
        return {"match_precision": self.correct / self.matches if self.matches else 0.0,
                "matches": self.matches / self.pairs if self.pairs else 0.0}


def overlay_images(images: torch.Tensor, labels: torch.Tensor, predictions: list) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB: the image with labels in red and predictions in green.

    images: (N, 1, H, W) in [0, 1]; labels: (N, 1, H, W) binary; predictions: N arrays (K, 2) x, y.
    """
    out = []
    for image, lab, pred in zip(images, labels, predictions):
        gt = torch.nonzero(lab[0] > 0.5).flip(-1).cpu().numpy()
        canvas = draw_keypoints(image[0].detach().float().cpu().numpy(), gt, RED, radius=1)
        canvas = draw_keypoints(canvas, pred, GREEN, radius=1)
        out.append(canvas[..., ::-1])  # BGR -> RGB
    return np.stack(out)


# --------------------------------------------------------------------------------------------------
# Processes, sampling, seeding
# --------------------------------------------------------------------------------------------------

@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun; a single process without them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedContext()
    return DistributedContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                              int(os.environ.get("LOCAL_RANK", 0)))


def default_device(ctx: DistributedContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (seed, epoch, rank...), well mixed."""
    return int(np.random.SeedSequence([int(p) % 2 ** 63 for p in parts]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """This rank's share of epoch e (`DistributedSampler` order for `seed` and e), from position `start`
    of the share on: `set_position(epoch, start)` resumes in the middle of an epoch."""

    def __init__(self, dataset, ctx: DistributedContext, shuffle: bool, seed: int):
        self.base = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                       seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.base), self.start, None)

    def __len__(self) -> int:
        return len(self.base) - self.start


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------

class Trainer:
    """Training of one configuration (see the module docstring).

    conf: a config merged over `default_conf`. exper_dir: EXPER_PATH/<exper>. runs_dir: the
    tensorboard folder (None: no tensorboard). validate: the --eval flag. device: default cuda (the
    local rank's GPU) if available, else cpu. datasets: optional (train, val) datasets instead of
    building them from `data.dataset`.
    """

    def __init__(self, conf: Mapping, exper_dir: str | Path, runs_dir: str | Path | None = None,
                 validate: bool = False, device: torch.device | str | None = None, datasets=None,
                 source: str = "config"):
        self.conf, self.source = conf, source
        self.ctx = distributed_context()
        self.exper_dir = Path(exper_dir)
        self.checkpoint_dir = self.exper_dir / "checkpoints"
        self.validate_enabled = validate
        mconf, tconf = conf["model"], conf["training"]
        self._check_conf()
        if self.ctx.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.device = torch.device(device) if device is not None else default_device(self.ctx)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        self.seed = conf["seed"] if conf["seed"] is not None else int(time.time()) % 2 ** 31
        self._seed_everything(derived_seed(self.seed, -1, self.ctx.rank))

        # Precision and memory layout (utils.precision).
        self.precision = check_choice(tconf["precision"], precision_lib.PRECISIONS, "training.precision", source)
        try:
            self.concrete_precision = precision_lib.resolve(self.precision, self.device)
        except ValueError as e:
            raise ConfigError(f"{source}: training.precision: {e}") from e
        cl = tconf["channels_last"]
        check_choice(cl, (True, False, "auto"), "training.channels_last", source)
        self.channels_last = precision_lib.use_channels_last(self.precision, self.device) if cl == "auto" else cl

        # Network, optimizer, losses.
        self.net = get_model(mconf["name"], mconf["params"]).to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=mconf["learning_rate"])
        self.scaler = precision_lib.grad_scaler(self.precision, self.device)
        self.loss_type = mconf["detector_loss"]["loss_type"]
        self.descriptor_loss = get_descriptor_loss(mconf)
        self.lambda_loss = float(mconf["lambda_loss"] or 0)
        self.nan_skipped = 0
        self.n_iter = self._restore()
        self.model = self.net
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Without a descriptor loss the descriptor head gets no gradient.
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=ids, find_unused_parameters=self.descriptor_loss is None)

        # Data.
        self.per_rank_batch = self._per_rank_batch(mconf["batch_size"])
        self.train_set, self.val_set = datasets if datasets is not None else self._build_datasets()
        data_conf = getattr(self.train_set, "conf", conf["data"]) or {}
        self.gaussian = bool((data_conf.get("gaussian_label") or {}).get("enable"))
        self.train_sampler = ResumableSampler(self.train_set, self.ctx, shuffle=True, seed=self.seed)
        self.steps_per_epoch = len(self.train_sampler) // self.per_rank_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{source}: the training set has {len(self.train_set)} samples, fewer than one "
                              f"batch of model.batch_size {mconf['batch_size']}")
        self.loader_generator = torch.Generator()
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(self.train_set, batch_size=self.per_rank_batch, sampler=self.train_sampler,
                                       num_workers=tconf["workers_train"], drop_last=True, pin_memory=pin,
                                       generator=self.loader_generator)
        self.val_loader = None
        if validate and self.ctx.is_main:
            workers = tconf["workers_val"]
            self.val_loader = DataLoader(self.val_set, batch_size=mconf["eval_batch_size"], shuffle=False,
                                         num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)

        self.writer = None
        if runs_dir is not None and self.ctx.is_main:
            self.writer = SummaryWriter(str(runs_dir))
        self.last_loss: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- set-up
    def _check_conf(self) -> None:
        c, s = self.conf, self.source
        check_choice(c["model"]["detector_loss"]["loss_type"], DETECTOR_LOSSES, "model.detector_loss.loss_type", s)
        for key in ("train_iter", "save_interval", "validation_interval", "tensorboard_interval",
                    "validation_size"):
            if not isinstance(c[key], int) or c[key] < (0 if key == "train_iter" else 1):
                raise ConfigError(f"{s}: '{key}' is {c[key]!r}; expected a positive integer")
        for key in ("batch_size", "eval_batch_size"):
            if not isinstance(c["model"][key], int) or c["model"][key] < 1:
                raise ConfigError(f"{s}: 'model.{key}' is {c['model'][key]!r}; expected a positive integer")
        patience = c["training"]["nan_patience"]
        if not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"{s}: 'training.nan_patience' is {patience!r}; expected a positive integer")
        if not isinstance(c["model"]["learning_rate"], (int, float)) or not c["model"]["learning_rate"] > 0:
            raise ConfigError(f"{s}: 'model.learning_rate' is {c['model']['learning_rate']!r}; expected > 0")
        if not (c["data"] or {}).get("dataset"):
            raise ConfigError(f"{s}: required key 'data.dataset' is missing or empty")
        milestones, decay = c["training"]["lr_milestones"], c["training"]["lr_decay"]
        if not isinstance(milestones, list) or not all(isinstance(m, int) and m > 0 for m in milestones):
            raise ConfigError(f"{s}: 'training.lr_milestones' is {milestones!r}; expected a list of positive "
                              f"iterations, e.g. [20000]")
        if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"{s}: 'training.lr_decay' is {decay!r}; expected a number in (0, 1], e.g. 0.1")

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
        train = cls(self.conf["data"], task="train", seed=self.seed)
        val = cls(self.conf["data"], task="val", seed=self.seed) if self.validate_enabled and self.ctx.is_main else None
        if self.ctx.enabled and self.ctx.is_main:
            dist.barrier()
        return train, val

    def _restore(self) -> int:
        """Load `pretrained` when `retrain` is false; returns the iteration to start from."""
        path = extractor.weights_path(self.conf)
        if self.conf["retrain"]:
            if path:
                log.warning("retrain is true: ignoring pretrained %s (set retrain: false to load it)", path)
            return 0
        if not path:
            raise ConfigError(f"{self.source}: retrain is false but no 'pretrained' checkpoint is given")
        raw = load_weights_into(self.net, path)
        n_iter = 0
        if "model_state_dict" in raw:
            if raw.get("optimizer_state_dict"):
                self.optimizer.load_state_dict(raw["optimizer_state_dict"])
                for group in self.optimizer.param_groups:
                    group["lr"] = self.conf["model"]["learning_rate"]
            if raw.get("scaler_state_dict") and self.scaler.is_enabled():
                self.scaler.load_state_dict(raw["scaler_state_dict"])
            n_iter = int(raw.get("n_iter", 0))
            self.nan_skipped = int(raw.get("nan_skipped", 0))
            log.info("resumed from %s: model, optimizer%s, iteration %d", path,
                     "" if raw.get("optimizer_state_dict") else " (none saved)", n_iter)
        else:
            log.info("loaded network weights from %s (no optimizer state or iteration in it)", path)
        if self.conf["reset_iter"]:
            n_iter, self.nan_skipped = 0, 0
        return n_iter

    def _seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ---------------------------------------------------------------- one step
    def forward(self, images: torch.Tensor, model=None) -> dict:
        """The network on (B, 1, H, W) images at the configured precision; outputs in fp32."""
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision_lib.autocast(self.precision, self.device):
            out = (model or self.model)(x)
        return {key: value.float() for key, value in out.items()}

    def _labels(self, batch: Mapping, warped: bool) -> torch.Tensor:
        key = ("warped_labels" if warped else "labels_2D") + ("_gaussian" if self.gaussian else "")
        if key not in batch:
            raise KeyError(f"the dataset's samples have no '{key}' (needed by the detector loss)")
        return batch[key].to(self.device, non_blocking=True)

    def compute_losses(self, out: Mapping, batch: Mapping) -> dict:
        """Loss terms of a batch from the fp32 network outputs of `torch.cat([image, warped_img])`
        (or of `image` alone without a warped pair). Returns {name: scalar tensor}, 'loss' the total."""
        b = batch["image"].shape[0]
        pair = "warped_img" in batch
        semi = out["semi"]
        valid = batch["valid_mask"].to(self.device, non_blocking=True)
        losses = {"loss_det": detector_loss(semi[:b], labels_to_cell_targets(self._labels(batch, False)),
                                            valid_mask_to_cells(valid), self.loss_type)}
        total = losses["loss_det"]
        if pair:
            warped_valid = batch["warped_valid_mask"].to(self.device, non_blocking=True)
            losses["loss_det_warp"] = detector_loss(
                semi[b:], labels_to_cell_targets(self._labels(batch, True)), valid_mask_to_cells(warped_valid),
                self.loss_type)
            total = total + losses["loss_det_warp"]
        if self.descriptor_loss is not None:
            if not pair:
                raise ConfigError(f"{self.source}: model.lambda_loss > 0 needs warped pairs "
                                  f"(data.warped_pair.enable: true)")
            homographies = batch["homographies"].to(self.device, non_blocking=True)
            loss_desc, stats = self.descriptor_loss(out["desc"][:b], out["desc"][b:], homographies, warped_valid)
            losses["loss_desc"] = loss_desc
            losses.update(stats)
            total = total + self.lambda_loss * loss_desc
        losses["loss"] = total
        return losses

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
        images = batch["image"]
        if "warped_img" in batch:
            images = torch.cat([images, batch["warped_img"]])
        buffers = [b.detach().clone() for b in self.net.buffers()]
        out = self.forward(images)
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
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # the forward pass fed the NaNs into the BatchNorm statistics
                for saved, buf in zip(buffers, self.net.buffers()):
                    buf.copy_(saved)
        return {k: v.detach() for k, v in losses.items()}, out, finite

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        """Losses, detection and matching metrics over the first `validation_size` validation batches, in
        eval mode."""
        self.net.eval()
        metrics = DetectionMetrics()
        sums: dict = {}
        n_batches = 0
        first = None
        matching = MatchingMetrics()
        try:
            # The same descriptor-loss draws at every validation; the training random state is kept.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for batch in islice(self.val_loader, self.conf["validation_size"]):
                    images = batch["image"]
                    if "warped_img" in batch:
                        images = torch.cat([images, batch["warped_img"]])
                    out = self.forward(images, model=self.net)
                    for key, value in self.compute_losses(out, batch).items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    b = batch["image"].shape[0]
                    heatmap = logits_to_heatmap(out["semi"][:b])
                    predictions = metrics.update(heatmap, batch["labels_2D"], batch.get("valid_mask"))
                    if "warped_img" in batch:
                        matching.update(heatmap, out["desc"][:b], logits_to_heatmap(out["semi"][b:]),
                                        out["desc"][b:], batch["homographies"])
                    if first is None:
                        first = (batch["image"][:TENSORBOARD_MAX_IMAGES], batch["labels_2D"][:TENSORBOARD_MAX_IMAGES],
                                 predictions[:TENSORBOARD_MAX_IMAGES], heatmap[:TENSORBOARD_MAX_IMAGES])
                    n_batches += 1
        finally:
            self.net.train()
        if n_batches == 0:
            raise ConfigError(f"{self.source}: the validation set is empty")
        result = {key: value / n_batches for key, value in sums.items()}
        result.update(metrics.compute())
        if matching.pairs:
            result.update(matching.compute())
        if self.writer is not None:
            for key, value in result.items():
                self.writer.add_scalar(f"val-{key}", value, self.n_iter)
            self._write_images("val", *first)
        return result

    def _write_images(self, prefix: str, images, labels, predictions, heatmap) -> None:
        self.writer.add_images(f"{prefix}-labels_vs_predictions", overlay_images(images, labels, predictions),
                               self.n_iter, dataformats="NHWC")
        self.writer.add_images(f"{prefix}-heatmap", heatmap[:, None].clamp(0, 1).cpu(), self.n_iter,
                               dataformats="NCHW")

    def _log_train(self, losses: dict, out: dict, batch: Mapping) -> None:
        if self.writer is None:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f"train-{key}", float(value), self.n_iter)
        if self.n_iter % self.conf["tensorboard_interval"] == 0:
            b = batch["image"].shape[0]
            metrics = DetectionMetrics()
            heatmap = logits_to_heatmap(out["semi"][:b].detach())
            predictions = metrics.update(heatmap, batch["labels_2D"], batch.get("valid_mask"))
            scores = metrics.compute()
            self.writer.add_scalar("train-precision", scores["precision"], self.n_iter)
            self.writer.add_scalar("train-recall", scores["recall"], self.n_iter)
            k = TENSORBOARD_MAX_IMAGES
            self._write_images("train", batch["image"][:k], batch["labels_2D"][:k], predictions[:k], heatmap[:k])

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Optional[Path]:
        """Checkpoint of the current state (rank 0 only; other ranks return None)."""
        if not self.ctx.is_main:
            return None
        extra = {"nan_skipped": self.nan_skipped}
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
            return {**summary, "iterations": self.n_iter, "nan_skipped": 0, "seconds": 0.0}
        log.info("training %s from iteration %d to %d: %s precision, channels_last %s, device %s, "
                 "%d process(es), batch %d per process", c["model"]["name"], self.n_iter, train_iter,
                 self.concrete_precision, self.channels_last, self.device, self.ctx.world_size, self.per_rank_batch)
        start_time = time.perf_counter()
        data_time = 0.0
        consecutive_nan = 0
        validated_at = saved_at = None
        progress = tqdm(total=train_iter, initial=self.n_iter, disable=not self.ctx.is_main, dynamic_ncols=True,
                        desc="train", unit="it")
        batches = self._batches()
        # SIGTERM (schedulers, `kill`) is handled like Ctrl-C: a checkpoint is saved.
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _interrupt)
        try:
            while self.n_iter < train_iter:
                t0 = time.perf_counter()
                batch = next(batches)
                data_time += time.perf_counter() - t0
                # The descriptor loss's random draws depend on the iteration alone: a resumed run repeats them.
                torch.manual_seed(derived_seed(self.seed, -2, self.n_iter, self.ctx.rank))
                losses, out, stepped = self.train_step(batch)
                self.n_iter += 1
                progress.update(1)
                if stepped:
                    consecutive_nan = 0
                    self.last_loss = losses["loss"]
                    self._log_train(losses, out, batch)
                    if self.n_iter % 10 == 0 or self.n_iter == train_iter:
                        progress.set_postfix(loss=f"{float(losses['loss']):.4f}")
                else:
                    self.nan_skipped += 1
                    consecutive_nan += 1
                    log.warning("iteration %d: non-finite loss (%s); step skipped (%d in a row)", self.n_iter,
                                ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()), consecutive_nan)
                    if consecutive_nan >= c["training"]["nan_patience"]:
                        path = self.save()
                        raise TrainingDiverged(
                            f"the loss was NaN/inf for {consecutive_nan} consecutive iterations, the last at "
                            f"iteration {self.n_iter}; stopped, checkpoint {path or checkpoint_name(self.n_iter)}. "
                            f"Lower model.learning_rate or check the data, then resume from the checkpoint")
                if self.validate_enabled and self.n_iter % c["validation_interval"] == 0:
                    summary["validation"] = self._validate_and_record()
                    validated_at = self.n_iter
                if self.n_iter % c["save_interval"] == 0:
                    summary["checkpoint"] = self.save()
                    saved_at = self.n_iter
        except KeyboardInterrupt:
            path = self.save()
            if path is not None:
                log.warning("interrupted at iteration %d; checkpoint saved to %s", self.n_iter, path)
            raise
        finally:
            progress.close()
            batches.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if saved_at != self.n_iter:
            summary["checkpoint"] = self.save()
        if self.validate_enabled and validated_at != self.n_iter:
            summary["validation"] = self._validate_and_record()
        seconds = time.perf_counter() - start_time
        done = self.n_iter - summary["start_iteration"]
        log.info("%d iterations in %.1f s (%.2f it/s, %.0f%% of it waiting for data); %d skipped (NaN/inf)",
                 done, seconds, done / max(seconds, 1e-9), 100 * data_time / max(seconds, 1e-9), self.nan_skipped)
        if self.writer is not None:
            self.writer.flush()
        return {**summary, "iterations": self.n_iter, "nan_skipped": self.nan_skipped, "seconds": seconds,
                "data_seconds": data_time}

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

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest iteration in a folder, or None."""
    best = None
    for path in Path(checkpoint_dir).glob("superPointNet_*_checkpoint.pth.tar"):
        number = path.name[len("superPointNet_"):-len("_checkpoint.pth.tar")]
        if number.isdigit() and (best is None or int(number) > best[0]):
            best = (int(number), path)
    return best[1] if best else None


def add_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in EXPER_PATH/<exper_name>/checkpoints "
                             "(model, optimizer and iteration)")


def run(args) -> dict:
    """`train4.py <task> <config> <exper_name> [--eval] [--resume]`."""
    conf = load_config(args.config, default_conf)
    return train(conf, args.exper_name, args.task, validate=args.eval, resume=args.resume, source=args.config)


def train(conf: dict, exper_name: str, task: str, validate: bool = False, resume: bool = False,
          exper_root: str | Path | None = None, runs_root: str | Path = "runs", source: str = "config") -> dict:
    """Run a training task for a config merged over `default_conf`; outputs under exper_root/exper_name."""
    exper_dir = Path(exper_root if exper_root is not None else settings.EXPER_PATH) / exper_name
    ctx = distributed_context()
    if resume:
        found = latest_checkpoint(exper_dir / "checkpoints")
        if found is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", exper_dir / "checkpoints")
        else:
            conf = {**conf, "retrain": False, "reset_iter": False, "pretrained": str(found),
                    "model": {**conf["model"], "pretrained": None}}
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    runs_dir = tensorboard_dir(runs_root, task, exper_name) if ctx.is_main else None
    trainer = Trainer(conf, exper_dir, runs_dir=runs_dir, validate=validate, source=source)
    try:
        if ctx.is_main:
            merged = {**conf, "data": getattr(trainer.train_set, "conf", conf["data"])}
            write_text(exper_dir / "config.yml", yaml.safe_dump(_plain(merged), sort_keys=False))
            log.info("experiment folder %s; tensorboard %s", exper_dir, runs_dir)
        return trainer.run()
    finally:
        trainer.close()
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _plain(obj):
    """A YAML-safe copy (tuples -> lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
