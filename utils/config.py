"""Configuration files: loading, merging with defaults, checking values.

Every component keeps its defaults next to its code as a plain nested dict (`default_conf`). A task
combines the defaults of the components it uses into one schema, and `merge` checks the user's YAML
against it: an unknown or misspelt key is an error that names the key and the file. Defaults are never
mutated; `merge` returns new dicts.

Two markers can stand as a default value:
- `OPEN`: the key accepts any value, including a nested dict with any keys (e.g. `model.params`).
- `IGNORED`: a key of the reference's configs that this project accepts but does not use (TF-era
  keys such as `cache_in_memory`). It is kept in the merged config with the user's value.

Values are checked once, where a component turns its merged section into the settings it runs with,
with the small set of `check_*` functions below (integers, numbers in a range, positive numbers,
choices, lists): each returns the value in its checked type or raises a one-line ConfigError naming
the file and the dotted key and showing a valid example.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable, Mapping

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


# --------------------------------------------------------------------------------------------------
# Value checks. Each takes the value, its dotted key and the config file (`source`), and returns the
# value in its checked type, or raises a one-line ConfigError:
#     "<file>: 'training.lr_decay' is 2; expected a number in (0, 1], e.g. 0.1"
# Use the returned value: `check_number` turns numeric strings into floats, because YAML 1.1 (PyYAML)
# reads `1e-3` (no dot) as the string '1e-3'. Booleans are never numbers.
#
#     check_int(v, "train_iter", src, minimum=0)                  int >= 0
#     check_positive(v, "model.learning_rate", src)               float > 0
#     check_number(v, "training.lr_decay", src, 0, 1, open_low=True)   float in (0, 1]
#     check_choice(v, ("fp32", "bf16"), "training.precision", src)
#     check_list(v, "training.lr_milestones", src, item=partial(check_int, minimum=1), example="[20000]")
# --------------------------------------------------------------------------------------------------

def _fail(value: Any, key: str, source: str, expected: str, example: Any = None) -> ConfigError:
    hint = f", e.g. {example}" if example is not None else ""
    return ConfigError(f"{source}: '{key}' is {value!r}; expected {expected}{hint}")


def check_int(value: Any, key: str, source: str = "config", minimum: int | None = None,
              example: Any = None) -> int:
    """An integer (>= `minimum` when given); an integer-valued string such as '2000' is accepted."""
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or (minimum is not None and number < minimum):
        what = ("an integer" if minimum is None else "a positive integer" if minimum == 1
                else f"an integer >= {minimum}")
        raise _fail(value, key, source, what, example if example is not None else max(minimum or 0, 1))
    return number


def check_number(value: Any, key: str, source: str = "config", low: float | None = None, high: float | None = None,
                 open_low: bool = False, open_high: bool = False, example: Any = None) -> float:
    """A number as float, within [low, high] (open ends with open_low / open_high; None: unbounded).
    Numeric strings ('1e-3') are accepted."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    ok = isinstance(number, (int, float)) and not isinstance(number, bool) and number == number
    if ok and low is not None:
        ok = number > low if open_low else number >= low
    if ok and high is not None:
        ok = number < high if open_high else number <= high
    if not ok:
        if low is not None and high is not None:
            what = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            what = f"a number {'>' if open_low else '>='} {low}"
        elif high is not None:
            what = f"a number {'<' if open_high else '<='} {high}"
        else:
            what = "a number"
        raise _fail(value, key, source, what, example)
    return float(number)


def check_positive(value: Any, key: str, source: str = "config", example: Any = None) -> float:
    """A number > 0, as float (numeric strings accepted)."""
    return check_number(value, key, source, low=0, open_low=True, example=example)


def check_choice(value: Any, choices, key: str, source: str = "config") -> Any:
    """Return `value` if it is one of `choices`, else a ConfigError naming the key."""
    if value not in choices:
        raise _fail(value, key, source, f"one of {list(choices)}")
    return value


def check_list(value: Any, key: str, source: str = "config", item: Callable | None = None,
               example: Any = None) -> list:
    """A list (a tuple is accepted), each element checked by `item(element, 'key[i]', source)` when given
    (e.g. `functools.partial(check_int, minimum=1)`); returns the checked elements."""
    if not isinstance(value, (list, tuple)):
        raise _fail(value, key, source, "a list", example)
    if item is None:
        return list(value)
    return [item(v, f"{key}[{i}]", source) for i, v in enumerate(value)]


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
