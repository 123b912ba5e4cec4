"""near_dedup: semantic near-duplicates (embedding cosine >= the cut; pairs from
:func:`..neardup.similar_pairs`), within and across classes; each dropped image names the kept image it
is a copy of (:func:`..table.duplicate_drops`).

The cut is ``curate.near_dup_threshold``, or with ``auto`` (the default) measured on the pool
(:mod:`..calibrate`): cosines of one embedding model say nothing about another's. ``auto`` is refused
with random/untrained weights (their similarities are noise that happens to be high); an explicit cut
is the user's call, and either way a step that would drop more than ``curate.max_dup_share`` of the
pool stops the run before anything is written.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.records import DropReason

from ..calibrate import COPY_PREFIX, calibrate
from ..hashing import thumbs_array
from ..neardup import similar_pairs
from ..table import Context, Counts, alive, duplicate_drops, refuse_mass_drop

NAME = "near_dedup"
log = logging.getLogger("kd3.curate")


def check(embedder, c) -> None:
    """Before any work: a calibrated cut needs embeddings that mean something."""
    if c.near_dup and c.near_dup_threshold == "auto" and not embedder.trained:
        raise ConfigError(
            f"curate.near_dup: {embedder.model_name} has random/untrained weights, so its cosine similarities say "
            f"nothing about duplicates; set curate.clip_pretrained or curate.clip_weights, use "
            f"curate.embed_backend: teacher, turn it off (--no-curate.near_dup) or set "
            f"--curate.near_dup_threshold yourself")


def wants_planted_copies(c) -> bool:
    return bool(c.near_dup) and c.near_dup_threshold == "auto"


def _cut(ctx: Context, shas: list[str], X: np.ndarray) -> tuple[float, dict]:
    c = ctx.c
    if c.near_dup_threshold != "auto":
        return float(c.near_dup_threshold), {}
    planted = [s for s in ctx.emb.ids if s.startswith(COPY_PREFIX) and s[len(COPY_PREFIX):] in ctx.emb]
    orig = ctx.emb.matrix([s[len(COPY_PREFIX):] for s in planted]) if planted else np.zeros((0, 1), np.float32)
    copies = ctx.emb.matrix(planted) if planted else np.zeros((0, 1), np.float32)
    thumbs = thumbs_array([ctx.facts.rows.get(s, {}).get("thumb") for s in shas])
    cal = calibrate(X, thumbs, orig, copies, c.phash_max_pixel_diff, shas)
    caught = cal["copies_caught"]
    log.info("curate: near-dup cut %.4f calibrated on the pool: catches %s of %d planted re-encodes, %.1f%% of %d "
             "sampled images have an unrelated neighbour above it", cal["threshold"],
             "–" if caught is None else f"{caught:.0%}", cal["copies"], 100 * (cal["unrelated_above"] or 0),
             cal["neighbours_sampled"])
    if cal["at_top"]:
        log.warning("curate: the near-dup cut sits at the top of the cosine scale (%.4f): unrelated images share "
                    "identical features under these embeddings, so near-dup only merges feature-identical images "
                    "(ties go to the earliest crawled); pHash still removes pixel copies",
                    cal["threshold"])
    elif caught is not None and caught < 0.5:
        log.warning("curate: these embeddings barely separate copies from unrelated images: the safe cut %.4f "
                    "catches only %.0f%% of planted re-encodes (pHash still removes pixel copies)",
                    cal["threshold"], 100 * caught)
    return cal["threshold"], {"calibration": cal}


def decide(rows, ctx: Context) -> Optional[Counts]:
    c = ctx.c
    if not c.near_dup:
        return None
    ids = [i for i in alive(rows) if rows[i].id in ctx.emb]
    shas = [rows[i].id for i in ids]
    X = ctx.emb.matrix(shas) if ids else np.zeros((0, 1), np.float32)
    t, info = _cut(ctx, shas, X)
    a, b = similar_pairs(X, t) if len(ids) > 1 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    sims = (X[a] * X[b]).sum(1) if len(a) else np.zeros(0, np.float32)
    dropped = duplicate_drops(rows, ids, a, b, DropReason.NEAR_DUP, lambda k: f"cosine {sims[k]:.4f} >= {t:.4f}")
    how = "the cut calibrated on this pool" if info else "--curate.near_dup_threshold"
    refuse_mass_drop(NAME, dropped, len(ids), c.max_dup_share,
                     f"cosine >= {t:.4f} ({how}) merges unlike images under these embeddings: set a higher "
                     f"--curate.near_dup_threshold (or auto) or turn it off with --no-curate.near_dup")
    return Counts(dropped, {"threshold": round(t, 6), **info})
