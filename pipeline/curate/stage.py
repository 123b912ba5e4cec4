"""The curate stage: crawl output (or a local folder) -> decisions, embeddings, index, shards, manifest.

Data flows one way (img2dataset style); this module only wires the parts:

    sources ─▶ scan: decode, pHash, embed (one streaming pass, cached per sha) ─▶ facts table + scores
        ─▶ for step in STEPS: step.decide(rows, ctx)       (pure and fast; each drop policy is one module)
        ─▶ outputs: embeddings, index, shards, decisions.jsonl, manifest.json (last)

The expensive pass is cached under ``curate/cache/`` keyed by image sha256 (+ embedding model), so a
rerun after a crash or with other thresholds only re-decides.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.errors import DataError
from pipeline.core.runs import RunDir

from . import sources
from .calibrate import plant_copies
from .decontam import eval_files
from .embed import EmbeddingCache, make_embedder
from .outputs import print_summary, write_all
from .relevance import check_filter_allowed
from .scan import FactsCache, cache_key, scan
from .steps import decontaminate, exact_dedup, near_dedup, phash_dedup, relevance, validate
from .table import Context, alive, build_rows, score

log = logging.getLogger("kd3.curate")

# Decontamination and relevance come before the dedup steps, so a contaminated or off-class image never
# becomes the representative that hides its duplicates.
STEPS = (validate, exact_dedup, decontaminate, relevance, phash_dedup, near_dedup)


def curate(cfg: RunConfig) -> dict[str, Any]:
    """Run the curate stage on ``cfg.run_dir``; return the manifest dict."""
    t_start = time.perf_counter()
    c = cfg.curate
    rd = RunDir(cfg.run_dir)
    if not rd.root.is_dir():
        raise DataError(f"run directory {rd.root} does not exist")
    classes = sources.classes_of(cfg, rd)
    src = sources.load(cfg, rd, classes)
    embedder = make_embedder(c, classes, cfg.teacher)
    check_filter_allowed(embedder, c.relevance_filter)  # refuse before any work
    near_dedup.check(embedder, c)
    rd.curate.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg)
    ev = list(dict(eval_files(c.decontaminate)).items()) if c.decontaminate is not None else []
    ctx = Context(c, classes, FactsCache(rd.curate / "cache" / "facts.jsonl"),
                  EmbeddingCache(rd.curate / "cache", cache_key(embedder)), src.collapsed, ev)
    uniq = list(dict((x.sha, x.file) for x in src.cands).items())
    log.info("curate: %d candidate images (%d unique files) in %d classes; embedder %s",
             len(src.cands), len(uniq), len(classes), embedder.key)
    embed_stats: dict[str, Any] = {}
    web = {s for s, _ in uniq}
    scan(uniq + [x for x in ev if x[0] not in web], c, embedder, ctx.facts, ctx.emb, embed_stats)
    if near_dedup.wants_planted_copies(c):
        embed_stats["planted_copies"] = plant_copies([x for x in uniq if ctx.facts.rows.get(x[0], {}).get("ok")],
                                                     embedder, ctx.emb, c)

    rows = build_rows(src.cands, ctx.facts)
    stats: dict[str, Any] = {"records": {"in": src.records, "out": src.ok,
                                         "dropped": {"not_ok": src.records - src.ok}}}
    score(rows, ctx, embedder)
    for step in STEPS:
        counts = step.decide(rows, ctx)
        if counts is not None:  # None: the step is not configured for this run
            out = len(alive(rows))
            stats[step.NAME] = {"in": out + sum(counts.dropped.values()), "out": out,
                                "dropped": dict(counts.dropped), **counts.info}
    manifest = write_all(cfg, rd, rows, src, ctx, embedder, stats, embed_stats, t_start)
    print_summary(manifest, rows)
    return manifest
