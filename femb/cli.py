"""What the command-line tools in ``scripts/`` share: flags, logging and exit statuses.

Every tool exits 0 on success, 1 on a user error (a missing file, an unreadable image, a bad
value: the message goes to stderr as ``error: ...``, without a traceback) and 2 on bad flags
(argparse's status). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

#: The exceptions a tool reports as ``error: <message>`` (exit 1): OSError for missing or
#: unreadable files, ValueError for bad values, NotImplementedError for unsupported options,
#: ModuleNotFoundError for an optional package that is not installed (pyarrow, onnx).
USER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    NotImplementedError,
    ModuleNotFoundError,
)

#: Hydra's log format, so that tool and training logs read alike.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def setup_logging(quiet: bool = False) -> None:
    """femb's progress at INFO (WARNING when ``quiet``); other libraries at WARNING (the ONNX
    exporters are chatty). For a tool's ``main`` only: the library itself never configures
    logging."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("femb").setLevel(logging.WARNING if quiet else logging.INFO)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help="auto, cpu, cuda or cuda:N")


def add_flip(
    parser: argparse.ArgumentParser,
    help: str = "flip test (default: as the run was evaluated, its flip_test)",
) -> None:
    """``--flip`` / ``--no-flip``; None (the run's own ``flip_test``) when neither is given."""
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help=help)


def add_json(parser: argparse.ArgumentParser, help: str = "print a JSON object") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def run_tool(
    body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = USER_ERRORS
) -> int:
    """Run a tool's work; ``errors`` become ``error: <message>`` on stderr and status 1.

    Returns:
        ``body()``'s status (0 when it returns None), or 1 after a user error.
    """
    try:
        status = body()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if status is None else status


__all__ = [
    "LOG_FORMAT",
    "USER_ERRORS",
    "add_device",
    "add_flip",
    "add_json",
    "add_quiet",
    "run_tool",
    "setup_logging",
]
