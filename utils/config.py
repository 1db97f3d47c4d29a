"""Configuration files: loading, merging with defaults, validation.

Every component keeps its defaults next to its code as a plain nested dict (`default_conf`). A task
combines the defaults of the components it uses into one schema, and `merge` checks the user's YAML
against it: an unknown or misspelt key is an error that names the key and the file. Defaults are never
mutated; `merge` returns new dicts.

Two markers can stand as a default value:
- `OPEN`: the key accepts any value, including a nested dict with any keys (e.g. `model.params`).
- `IGNORED`: a key of the reference's configs that this project accepts but does not use (TF-era
  keys such as `cache_in_memory`). It is kept in the merged config with the user's value.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration file is missing, unreadable, or has a wrong key or value."""


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __deepcopy__(self, memo):
        return self


OPEN = _Marker("OPEN")
IGNORED = _Marker("IGNORED")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            conf = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if conf is None:
        return {}
    if not isinstance(conf, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(conf).__name__}")
    return conf


def combine(*schemas: Mapping) -> dict:
    """Deep union of several default dicts (later ones win on leaf conflicts)."""
    out: dict = {}
    for schema in schemas:
        for key, value in schema.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = combine(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def merge(defaults: Mapping, user: Mapping | None, source: str = "config", prefix: str = "") -> dict:
    """Return `defaults` updated recursively with `user`, rejecting keys the defaults do not know.

    source: the file name (or other origin) quoted in errors.
    """
    out = {k: _resolved_default(v) for k, v in defaults.items()}
    if user is None:
        return out
    if not isinstance(user, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {user!r}")
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: unknown config key '{dotted}'.{hint} Known keys here: {sorted(map(str, defaults))}"
            )
        default = defaults[key]
        if default is OPEN or default is IGNORED:
            out[key] = copy.deepcopy(value)
        elif isinstance(default, Mapping):
            if value is None:
                continue
            out[key] = merge(default, value, source, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolved_default(value: Any) -> Any:
    if value is OPEN or value is IGNORED:
        return None
    if isinstance(value, Mapping):
        return {k: _resolved_default(v) for k, v in value.items()}
    return copy.deepcopy(value)


def load_config(path: str | Path, schema: Mapping) -> dict:
    """Load a YAML file and merge it into `schema` (see `merge`)."""
    return merge(schema, load_yaml(path), source=str(path))


def require(conf: Mapping, dotted_key: str, source: str = "config") -> Any:
    """Value at `a.b.c`, or a ConfigError naming the key if it is missing or empty."""
    node: Any = conf
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or node.get(part) in (None, ""):
            raise ConfigError(f"{source}: required key '{dotted_key}' is missing or empty")
        node = node[part]
    return node


def check_choice(value: Any, choices, key: str, source: str = "config") -> Any:
    """Return `value` if it is one of `choices`, else a ConfigError naming the key."""
    if value not in choices:
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected one of {list(choices)}")
    return value


def to_plain(obj: Any) -> Any:
    """A config with its markers and other objects turned into YAML-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def dump_config(path: str | Path, conf: Mapping) -> None:
    """Write a (merged) config as YAML, atomically: the experiment's record of what ran."""
    from utils.io import write_text  # utils.io imports nothing from here; local to keep config light

    write_text(path, yaml.safe_dump(to_plain(conf), sort_keys=False))
