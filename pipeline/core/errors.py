"""User-facing errors: the CLI prints ``kd3: error: <message>`` and exits 2, no traceback."""
from __future__ import annotations

import sys


class Kd3Error(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(Kd3Error):
    pass


class DataError(Kd3Error):
    """A run directory, manifest, shard or checkpoint is missing, corrupt or inconsistent."""


def report(e: Kd3Error) -> int:
    """The one-line message every kd3 entry point prints for a user error; returns the exit code."""
    print(f"kd3: error: {e}", file=sys.stderr)
    return e.exit_code
