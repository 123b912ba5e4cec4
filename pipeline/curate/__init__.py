"""The curate stage: crawl output (or a local folder) -> decisions, embeddings, index, shards, manifest.

``curate(cfg)`` (:mod:`pipeline.curate.stage`) wires: :mod:`.sources` -> :mod:`.scan` (decode, pHash,
embed; cached) -> the facts table (:mod:`.table`) -> each drop policy in :mod:`.steps` -> :mod:`.outputs`.
The algorithms the steps use (validate, hashing, decontam, relevance, neardup, index, shards, embed)
are modules of their own. Submodules never import this package back.
"""
import importlib
from typing import Any

__all__ = ["STEPS", "curate", "run_chunk", "worker_config"]


def __getattr__(name: str) -> Any:
    """``curate``, ``STEPS`` and the scan's worker side (``run_chunk``, ``worker_config``) load on first use: the config reads the CLIP embedder's settings
    (:mod:`.embed`) without importing the whole stage."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".stage", __name__), name)
