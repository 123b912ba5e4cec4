"""The curate stage: crawl output (or a local folder) -> decisions, embeddings, index, shards, manifest.

``curate(cfg)`` (:mod:`pipeline.curate.stage`) wires: :mod:`.sources` -> :mod:`.scan` (decode, pHash,
embed; cached) -> the facts table (:mod:`.table`) -> each drop policy in :mod:`.steps` -> :mod:`.outputs`.
The algorithms the steps use (validate, hashing, decontam, relevance, neardup, index, shards, embed)
are modules of their own. Submodules never import this package back.
"""
from .stage import STEPS, curate

__all__ = ["STEPS", "curate"]
