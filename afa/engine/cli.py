"""Command-line entry points: a user's mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from afa.crf import CRFUnavailableError
from afa.data.readers import DatasetError
from afa.engine.config import ConfigError
from afa.models.mit import ImageTooSmallError
from afa.models.weights import CheckpointError

T = TypeVar("T")

# Errors whose message already names the file or key and the fix.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, CheckpointError, FileNotFoundError, CRFUnavailableError, ImageTooSmallError,
)


def run_command(command: Callable[[], T]) -> T:
    """Run ``command``; a user error prints ``error: <message>`` and exits 2.

    ``HYDRA_FULL_ERROR=1`` keeps the traceback (hydra's own switch for full errors).
    """
    try:
        return command()
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_message(error: BaseException) -> str:
    """The error's own one line, also when a DataLoader worker raised it (torch re-raises it
    with the worker's traceback in the message; its last line is the original message)."""
    message = str(error.args[0] if isinstance(error, FileNotFoundError) and error.args else error)
    if "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.{type(error).__name__}: ") else last
    return message


STORED_GROUPS = ("model", "dataset", "method")


def stored_group_overrides(argv: list[str]) -> list[str]:
    """``dataset.root=x`` for eval.py: a key of a group the checkpoint stores (model, dataset,
    method) is added with hydra's ``+`` unless that group was chosen on the command line, so
    it overrides the stored config instead of failing on the absent group."""
    chosen = {arg.split("=", 1)[0].lstrip("+~") for arg in argv[1:] if "=" in arg}
    rewritten = [argv[0]]
    for arg in argv[1:]:
        key = arg.split("=", 1)[0]
        group = key.split(".", 1)[0]
        if "=" in arg and "." in key and group in STORED_GROUPS and group not in chosen and not arg.startswith(("+", "~")):
            arg = "+" + arg
        rewritten.append(arg)
    return rewritten
