"""Networks, chosen by `model.name`."""
from __future__ import annotations

from torch import nn

from models.SuperPointNet_gauss2 import SuperPointNet_gauss2
from models.SuperPointNet_pretrained import SuperPointNet_pretrained

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
