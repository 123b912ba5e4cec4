"""A process-wide "stop" flag for Ctrl-C.

Python delivers SIGINT to the main thread only; the ``kd3`` CLI's handler sets this flag before it
raises ``KeyboardInterrupt`` there, so work running in other threads (a flow's per-class crawl tasks
and their downloads) sees it and ends at the next URL instead of finishing its class.
"""
from __future__ import annotations

import threading

_STOP = threading.Event()


def request_stop() -> None:
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def reset() -> None:
    """Clear the flag (tests, or a long-lived process that runs again after an interrupt)."""
    _STOP.clear()
