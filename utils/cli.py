"""Shared command-line plumbing: logging set-up and turning expected errors into a clear message and a
non-zero exit instead of a traceback."""
from __future__ import annotations

import errno
import functools
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from utils.config import ConfigError
from utils.io import DataError
from utils import runs
from utils.runs import TooManyBadItems

EXPECTED_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError, KeyError)

# Exit statuses of every command (README, "What happens when things go wrong").
EXIT_BAD_INPUT = 2  # a config, command-line value or input file is wrong; or the output folder is taken
EXIT_DIVERGED = 3  # training stopped because the loss diverged (resume after lowering the learning rate)
EXIT_ENVIRONMENT = 4  # the machine refused: read-only or full disk, a path that is a file, permissions
EXIT_TOO_MANY_BAD = 5  # more bad input items than the allowed fraction
# Interrupted by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM), as shells report it.


def setup_logging(debug: bool = False) -> None:
    """INFO (or DEBUG with --debug) to stderr; safe to call twice (the reference's --debug was a no-op)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, force=True, handlers=[_StderrHandler()],
                        format="[%(asctime)s %(levelname)s %(name)s] %(message)s", datefmt="%H:%M:%S")


class _StderrHandler(logging.StreamHandler):
    """A handler on the sys.stderr of each message, not the one of setup time: a caller that replaces
    stderr (a notebook, a test capturing output, a redirecting wrapper) keeps getting the log, and a
    closed former stderr never breaks logging."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns its stream; the current stderr is used instead
        pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a termination signal; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupt():
    """Within the block SIGTERM (and SIGINT) raise `Interrupted`, so that the code that handles Ctrl-C
    (save a checkpoint, write the summary) also runs for a scheduler's or `kill`'s SIGTERM.
    A no-op outside the main thread (signals can only be handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def environment_message(error: OSError) -> str:
    """'<path>: <cause>' for an OSError raised by the machine (disk, permissions, a path that is a file)."""
    names = [n for n in (error.filename, error.filename2) if n]
    cause = error.strerror or str(error)
    hint = ""
    if error.errno == errno.ENOSPC:
        hint = "; free some space and rerun with --resume"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; choose a writable EXPER_PATH (or output folder)"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "; a path that should be a folder is a file (check EXPER_PATH and the experiment name)"
    return f"{' -> '.join(map(str, names)) + ': ' if names else ''}{cause}{hint}"


def exit_on_error(main):
    """Run `main`; an expected error prints one line `error: <message>` (never a traceback) and exits
    with the status of the table above."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        details = logging.getLogger("cli")
        argv = args[0] if args else kwargs.get("argv")
        script = Path(getattr(sys.modules.get(main.__module__), "__file__", None) or sys.argv[0]).name
        runs.command_line = [script, *(sys.argv[1:] if argv is None else argv)]
        try:
            with signals_as_interrupt():
                return main(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            details.debug("details", exc_info=True)
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            _fail(f"error: {message}", EXIT_BAD_INPUT)
        except TooManyBadItems as e:
            details.debug("details", exc_info=True)
            _fail(f"error: {e}", EXIT_TOO_MANY_BAD)
        except OSError as e:
            details.debug("details", exc_info=True)
            _fail(f"error: {environment_message(e)}", EXIT_ENVIRONMENT)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _fail(f"error: interrupted ({signal.Signals(signum).name}); the finished work is saved: rerun the "
                  f"same command (train4.py: with --resume) to continue", 128 + signum)
    return wrapper


def _fail(message: str, status: int) -> None:
    # Progress bars left open by the error would redraw after the message when garbage-collected.
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    try:
        print(message, file=sys.stderr)
    except OSError:  # stderr itself is gone (a closed pipe): the status still tells
        pass
    sys.exit(status)


def tensorboard_dir(runs_root: str | Path, task: str, exper_name: str) -> Path:
    """runs/<task>/<exper_name>_<YYYY-mm-dd_HH:MM:SS>, as the reference."""
    return Path(runs_root) / task / f"{exper_name}_{datetime.now():%Y-%m-%d_%H:%M:%S}"
