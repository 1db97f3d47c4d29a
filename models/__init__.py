"""Networks, chosen by `model.name`, and the weights this project ships for them."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from utils.io import DataError

from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained

# The project's own weights (pretrained/README.md: how each was made, its numbers): plain state_dicts of
# SuperPointNet_gauss2, loadable wherever a weights file is taken.
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED_MAGICPOINT = PRETRAINED_DIR / "magicpoint_synth.pth"
SHIPPED_SUPERPOINT = PRETRAINED_DIR / "superpoint_mix.pth"


def shipped_weights(path: Path) -> Path:
    """`path`, one of the shipped weights files; a DataError naming it when this checkout lacks it."""
    if not path.is_file():
        raise DataError(f"{path}: the project's shipped weights are missing from this checkout (restore "
                        f"pretrained/ with git checkout, or pass a weights file)")
    return path

NETWORKS = {
    "SuperPointNet_gauss2": SuperPointNet_gauss2,
    "SuperPointNet_pretrained": SuperPointNet_pretrained,
}


def get_model(name: str, params: dict | None = None) -> nn.Module:
    """Build the network called `name` with keyword `params`; an unknown name is a ValueError."""
    if name not in NETWORKS:
        raise ValueError(f"model.name is {name!r}; expected one of {sorted(NETWORKS)}")
    try:
        return NETWORKS[name](**(params or {}))
    except TypeError as e:
        raise ValueError(f"model.params {params!r} do not fit {name}: {e}") from e
