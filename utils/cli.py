"""Shared command-line plumbing: logging set-up and turning expected errors into a clear message and a
non-zero exit instead of a traceback."""
from __future__ import annotations

import functools
import logging
import sys
from datetime import datetime
from pathlib import Path

from utils.config import ConfigError
from utils.io import DataError

EXPECTED_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError, KeyError)


def setup_logging(debug: bool = False) -> None:
    """INFO (or DEBUG with --debug) to stderr; safe to call twice (the reference's --debug was a no-op)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, force=True,
                        format="[%(asctime)s %(levelname)s %(name)s] %(message)s", datefmt="%H:%M:%S")


def exit_on_error(main):
    """Run `main`; an expected error prints `error: <message>` and exits with status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            logging.getLogger("cli").debug("details", exc_info=True)
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def tensorboard_dir(runs_root: str | Path, task: str, exper_name: str) -> Path:
    """runs/<task>/<exper_name>_<YYYY-mm-dd_HH:MM:SS>, as the reference."""
    return Path(runs_root) / task / f"{exper_name}_{datetime.now():%Y-%m-%d_%H:%M:%S}"
