"""Command-line entry points: a user's mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from afa.data.readers import DatasetError
from afa.engine.config import ConfigError
from afa.models.weights import CheckpointError

T = TypeVar("T")

# Errors whose message already names the file or key and the fix.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, CheckpointError, FileNotFoundError)


def run_command(command: Callable[[], T]) -> T:
    """Run ``command``; a user error prints ``error: <message>`` and exits 2.

    ``HYDRA_FULL_ERROR=1`` keeps the traceback (hydra's own switch for full errors).
    """
    try:
        return command()
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = error.args[0] if isinstance(error, FileNotFoundError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
