"""What kd3 prints: its own log lines and progress bars; other libraries only when asked (``-v``).
Used by every kd3 entry point (the CLI, ``python -m flows.deploy``, a torchrun rank).

One handler on the root logger, with a filter: records of kd3's own packages pass at ``--log-level``
(INFO by default); records of everything else (Prefect, httpx, faiss's loader, open_clip's root-logger
lines, Hugging Face's retry warnings, torch) pass at WARNING, at INFO with ``-v`` and at DEBUG with
``-vv``. A few libraries are louder than that at WARNING and are held to ERROR unless ``-v`` is given.
"""
from __future__ import annotations

import logging
import os
import sys

KD3_PACKAGES = ("kd3", "pipeline", "crawlers", "distill", "flows", "kd3demo")
# third-party loggers whose WARNINGs are routine noise: Hugging Face logs every retry of a download it
# cannot make (dozens of lines before open_clip gives up); open_clip logs on the *root* logger, and its
# "Failed to download" ERROR repeats what kd3's own one-line error says.
LOUD = {"huggingface_hub": logging.ERROR, "root": logging.CRITICAL}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_own(name: str) -> bool:
    return name.split(".", 1)[0] in KD3_PACKAGES


class _Policy(logging.Filter):
    def __init__(self, own_level: int, other_level: int, verbose: int):
        super().__init__()
        self.own_level, self.other_level, self.verbose = own_level, other_level, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if is_own(record.name):
            return record.levelno >= self.own_level
        floor = self.other_level
        if not self.verbose:
            floor = max(floor, LOUD.get(record.name.split(".", 1)[0], floor))
        return record.levelno >= floor


def level_of(name: str | int) -> int:
    if isinstance(name, int):
        return name
    lvl = logging.getLevelName(str(name).upper())
    return lvl if isinstance(lvl, int) else logging.INFO


def setup_logging(level: str | int = "INFO", verbose: int = 0) -> None:
    """Install kd3's policy (idempotent: a second call replaces the first handler)."""
    own = level_of(level)
    other = logging.WARNING if verbose <= 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    if verbose >= 2:
        own = min(own, logging.DEBUG)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "kd3_policy", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.kd3_policy = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_Policy(own, other, verbose))
    root.addHandler(handler)
    root.setLevel(min(own, other))
    # Hugging Face attaches a handler of its own to its logger and sets the level from HF_HUB_VERBOSITY
    # when it is first imported: both say what that handler prints
    if not verbose:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.getLogger("huggingface_hub").setLevel(logging.NOTSET if verbose else LOUD["huggingface_hub"])
