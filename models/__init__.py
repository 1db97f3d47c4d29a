"""Networks, chosen by `model.name`, and the weights this project ships for them."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained

# The project's own weights (pretrained/README.md: how each was made, its numbers): plain state_dicts of
# SuperPointNet_gauss2, loadable wherever a weights file is taken.
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED_MAGICPOINT = PRETRAINED_DIR / "magicpoint_synth.pth"
SHIPPED_SUPERPOINT = PRETRAINED_DIR / "superpoint_mix.pth"

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
