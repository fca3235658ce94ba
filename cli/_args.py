"""Argument types and options shared by the console scripts (one wording for one kind of mistake)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

__all__ = [
    "USER_ERRORS",
    "add_set_option",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "run_reporting_errors",
]

# What bad input raises below the CLIs. Every error class of the pack subclasses ValueError (core/errors.py,
# weights.safe_load.WeightsError, trainer ConfigError/DatasetError, ...) and says what is wrong and where; OSError
# covers missing/unreadable files; PIL's DecompressionBombError is not a ValueError. A bug (TypeError,
# RuntimeError, ...) still shows its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _user_errors() -> tuple[type[BaseException], ...]:
    try:
        from PIL import Image

        return (*USER_ERRORS, Image.DecompressionBombError)
    except ImportError:  # pragma: no cover - PIL is a dependency
        return USER_ERRORS


def run_reporting_errors(prog: str, command: Callable[[], int | None]) -> int:
    """Run ``command``; bad input becomes one line ``<prog>: error: <message>`` on stderr and exit status 2.

    Ctrl-C (KeyboardInterrupt) becomes ``<prog>: interrupted`` (plus the exception's message, which says what was
    kept, if any) and exit status 130; a closed stdout pipe (BrokenPipeError) ends quietly with status 141.

    Args:
        prog (`str`): the console script's name, e.g. ``"l2i-labels"``.
        command (`Callable[[], int | None]`): the work; its return value is the exit status (None means 0).

    Returns:
        `int`: the exit status.
    """
    try:
        status = command()
    except KeyboardInterrupt as e:
        # Ctrl-C is the user's choice, not a bug: one line, no traceback, the shell's 128 + SIGINT. A command
        # that kept something (a checkpoint, the samples written so far) says so in the exception's message.
        kept = " ".join(str(e).split())
        print(f"{prog}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``l2i-convert inspect x | head``): stop quietly as Unix tools do. Point stdout at
        # /dev/null so that the interpreter's final flush does not print "Exception ignored ... BrokenPipeError".
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
            pass
        return 141
    except _user_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE ...`` (repeatable; collected in ``args.overrides``), as l2i-train reads its settings."""
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help
    )
