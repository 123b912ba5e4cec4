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


def one_line(text: object, limit: int = 200) -> str:
    """The first non-empty line of ``text`` (an exception's message), at most ``limit`` characters, cut at
    a word boundary with an ellipsis, so a quoted cause never ends mid-word."""
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if not first and isinstance(text, BaseException):
        first = type(text).__name__
    if len(first) <= limit:
        return first
    cut = first[: limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


def report(e: Kd3Error) -> int:
    """The one-line message every kd3 entry point prints for a user error; returns the exit code."""
    print(f"kd3: error: {e}", file=sys.stderr)
    return e.exit_code
