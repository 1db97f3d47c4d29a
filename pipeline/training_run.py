"""`train4.py <task> <config> <exper_name>`: one training run in an experiment folder. The folder is
checked against the run it already holds (utils.runs: a new run, `--resume` with the same configuration
except `RESUMABLE_KEYS`, or `--overwrite`), recorded in its run.json and config.yml, then the Trainer
(pipeline.trainer) trains.

Outputs: EXPER_PATH/<exper>/config.yml (the merged config), run.json, checkpoints/, metrics.jsonl (one
JSON object per validation) and tensorboard events in runs/<task>/<exper>_<date>.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

import settings
from models import extractor
from pipeline.trainer import Trainer
from pipeline.training_settings import OUTPUTS, RESUMABLE_KEYS, check_training_conf, default_conf
from utils import runs
from utils.checkpoints import latest_loadable_checkpoint
from utils.cli import tensorboard_dir
from utils.config import dump_config, load_config
from utils.distributed import distributed_context

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    # Unreadable items are limited by the config's training.max_bad_fraction, not by a flag.
    runs.add_arguments(parser, bad_fraction=False,
                       resume_help="continue from the latest checkpoint in EXPER_PATH/<exper_name>/checkpoints "
                                   "(model, optimizer and iteration); only with the recorded configuration, except "
                                   "the budget, learning rate, intervals and workers")


def run(args) -> dict:
    """`train4.py <task> <config> <exper_name> [--eval] [--resume | --overwrite]`."""
    conf = load_config(args.config, default_conf)
    return train(conf, args.exper_name, args.task, validate=args.eval, resume=args.resume,
                 overwrite=args.overwrite, source=args.config)


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
            runs.drop_rows_after(exper_dir / "metrics.jsonl", trainer.n_iter)
            merged = {**trainer.conf, "data": getattr(trainer.data.train_set, "conf", conf["data"])}
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
