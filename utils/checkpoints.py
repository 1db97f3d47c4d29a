"""Checkpoints in the reference's format and weight files of every kind users have.

A reference checkpoint `superPointNet_<iter>_checkpoint.pth.tar` is a dict with `n_iter`,
`model_state_dict`, `optimizer_state_dict` and `loss`; MagicLeap's `superpoint_v1.pth` is a plain
state_dict. Both load here; a `module.` prefix (DataParallel / DDP) is stripped.
"""
from __future__ import annotations

import errno
import logging
import pickle
from pathlib import Path
from typing import Mapping, Optional

import torch

from utils.io import DataError, atomic_path

log = logging.getLogger(__name__)


CHECKPOINT_PREFIX, CHECKPOINT_SUFFIX = "superPointNet_", "_checkpoint.pth.tar"


def checkpoint_name(n_iter: int) -> str:
    return f"{CHECKPOINT_PREFIX}{n_iter}{CHECKPOINT_SUFFIX}"


def checkpoint_iteration(path: str | Path) -> Optional[int]:
    """n of a `superPointNet_<n>_checkpoint.pth.tar` name, or None for any other name."""
    name = Path(path).name
    if not (name.startswith(CHECKPOINT_PREFIX) and name.endswith(CHECKPOINT_SUFFIX)):
        return None
    number = name[len(CHECKPOINT_PREFIX):-len(CHECKPOINT_SUFFIX)]
    return int(number) if number.isdigit() else None


def checkpoints_by_iteration(checkpoint_dir: str | Path) -> list:
    """The checkpoints of a folder as [(n, path)], latest first."""
    paths = Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}")
    found = [(checkpoint_iteration(p), p) for p in paths]
    return sorted(((n, p) for n, p in found if n is not None), key=lambda item: item[0], reverse=True)


def latest_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    """The checkpoint with the highest iteration in a folder (names as `checkpoint_name`), or None."""
    found = checkpoints_by_iteration(checkpoint_dir)
    return found[0][1] if found else None


def latest_loadable_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    """The latest checkpoint of a folder that loads; a later unreadable one (cut short by a full disk or
    a crash) is reported and passed over, so that a resume falls back to the one before it."""
    for _, path in checkpoints_by_iteration(checkpoint_dir):
        try:
            load_checkpoint(path)
            return path
        except DataError as e:
            log.warning("%s; resuming from an earlier checkpoint", e)
    return None


# The one-line conversion the refusal message and the README give, for a file the user trusts.
CONVERSION_RECIPE = (
    "python -c \"import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
    "c = c.get('model_state_dict', c) if isinstance(c, dict) else c.state_dict(); "
    "torch.save({'model_state_dict': dict(c)}, sys.argv[2])\" IN OUT")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """torch.load a weights or checkpoint file onto the CPU with `weights_only=True`, and only so.

    Tensors, state dicts and the plain values of the reference's checkpoints load; a file that pickles
    anything else (a class, a function) is refused, never unpickled: unpickling is how a crafted file
    runs code. The message says how to convert a trusted file. Unreadable files are a DataError too.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), None)
        if refused is None:  # not a refused object: a corrupt or truncated file
            raise DataError(f"{path}: not a readable PyTorch weights file ({_first_line(e)})") from None
        raise DataError(
            f"{path}: refused: it holds Python objects other than tensors ({refused}), and loading those "
            f"could run code. If you trust the file, convert it once: {CONVERSION_RECIPE}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise DataError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e


def _first_line(error: Exception) -> str:
    """The informative line of torch's multi-line unpickling message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(error).__name__)


def extract_state_dict(obj: Mapping, source: str = "weights") -> dict:
    """The model state_dict inside a reference checkpoint or a plain state_dict, `module.` stripped."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{source}: expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    state = obj.get("model_state_dict", obj)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"{source}: no model weights found (keys: {sorted(obj)[:8]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_weights_into(model: torch.nn.Module, path: str | Path) -> dict:
    """Load weights from `path` into `model` (strict). Returns the raw loaded object (for resume).

    A mismatch names the file, the model class and the keys that differ.
    """
    raw = load_checkpoint(path)
    state = extract_state_dict(raw, str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(k.startswith("conv1a") for k in state):
            hint = " These look like MagicLeap weights: set model.name: SuperPointNet_pretrained."
        elif any(k.startswith("inc.") for k in state):
            hint = " These look like reference weights: set model.name: SuperPointNet_gauss2."
        raise DataError(
            f"{path}: weights do not fit {type(model).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}.{hint}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise DataError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, "
                            f"{type(model).__name__} expects {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    return raw if isinstance(raw, dict) else {}


def save_checkpoint(folder: str | Path, n_iter: int, model: torch.nn.Module, optimizer=None, loss=None,
                    extra: Mapping | None = None) -> Path:
    """Write `<folder>/superPointNet_<n_iter>_checkpoint.pth.tar` atomically, in the reference format
    (`n_iter`, `model_state_dict` without a `module.` prefix, `optimizer_state_dict`, `loss`)."""
    module = model.module if hasattr(model, "module") else model
    state = {
        "n_iter": int(n_iter),
        "model_state_dict": module.state_dict(),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "loss": loss.detach().cpu() if torch.is_tensor(loss) else loss,
    }
    state.update(extra or {})
    path = Path(folder) / checkpoint_name(n_iter)
    with atomic_path(path, ".tar") as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch reports a full disk as a RuntimeError of its zip writer
            raise OSError(errno.EIO, f"could not write the checkpoint ({_first_line(e)}); the earlier checkpoints "
                                     f"are intact", str(path)) from None
    return path


def save_weights(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the network of a checkpoint (or weights file) as a plain fp32 state_dict, atomically: the
    form the project ships in pretrained/ (no optimizer, loadable with weights_only=True anywhere).

        python -c "from utils.checkpoints import save_weights; save_weights('CHECKPOINT', 'OUT.pth')"
    """
    state = extract_state_dict(load_checkpoint(checkpoint), str(checkpoint))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(Path(out), ".pth") as tmp:
        torch.save(state, tmp)
    return Path(out)


def restore_training(path: str | Path, net: torch.nn.Module, optimizer=None, scaler=None) -> dict:
    """Load a checkpoint (or plain weights) into `net`, and the optimizer and fp16 gradient-scaler states
    a checkpoint holds into `optimizer` / `scaler` (an enabled GradScaler only).

    Returns {'n_iter': iterations done (0 for plain weights), 'nan_skipped': skipped iterations so far,
    'loss_history': the trainer's recent good losses (divergence watch), 'checkpoint': whether it was a
    training checkpoint, 'optimizer': whether an optimizer state was loaded}.
    """
    raw = load_weights_into(net, path)
    state = {"n_iter": 0, "nan_skipped": 0, "loss_history": [], "checkpoint": "model_state_dict" in raw,
             "optimizer": False}
    if not state["checkpoint"]:
        log.info("loaded network weights from %s (no optimizer state or iteration in it)", path)
        return state
    if raw.get("optimizer_state_dict") and optimizer is not None:
        optimizer.load_state_dict(raw["optimizer_state_dict"])
        state["optimizer"] = True
    if raw.get("scaler_state_dict") and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(raw["scaler_state_dict"])
    state.update(n_iter=int(raw.get("n_iter", 0)), nan_skipped=int(raw.get("nan_skipped", 0)),
                 loss_history=[float(x) for x in raw.get("loss_history", [])])
    log.info("resumed from %s: model, optimizer%s, iteration %d", path,
             "" if state["optimizer"] else " (none saved)", state["n_iter"])
    return state
