"""The curate stage: crawl output (or a local folder) -> decisions, embeddings, index, shards, manifest.

Data flows one way (img2dataset style); this module only wires the parts:

    sources ─▶ scan: decode, pHash, embed (chunks of curate.scan_chunk images, cached per sha) ─▶ facts table
        ─▶ for step in STEPS: step.decide(rows, ctx)       (pure and fast; each drop policy is one module)
        ─▶ outputs: embeddings, index, shards, decisions.jsonl, manifest.json (last)

The expensive pass is cached under ``curate/cache/`` keyed by image sha256 (+ embedding model), so a
rerun after a crash or with other thresholds only re-decides. Its chunks run here one after another, or
wherever ``map_chunks`` sends them (the curate flow: one task each on a Dask cluster, :func:`run_chunk`
on the worker); the rest (dedup decisions, index, shards) is one reduce, here. Either way the outputs are
the same: the chunks, their batches and everything decided after them do not depend on where they ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.errors import DataError
from pipeline.core.runs import RunDir

from . import sources
from .calibrate import COPY_PREFIX, plant_copies, planted_sample
from .decontam import eval_files
from .embed import EmbeddingCache, make_embedder
from .outputs import print_summary, write_all
from .relevance import check_filter_allowed
from .scan import Chunk, FactsCache, absorb_parts, cache_key, check_key, decode_tag, plan_chunks, scan_chunk
from .steps import decontaminate, exact_dedup, near_dedup, phash_dedup, relevance, validate
from .table import Context, alive, build_rows, score

log = logging.getLogger("kd3.curate")

# Decontamination and relevance come before the dedup steps, so a contaminated or off-class image never
# becomes the representative that hides its duplicates.
STEPS = (validate, exact_dedup, decontaminate, relevance, phash_dedup, near_dedup)

MapChunks = Callable[[list[Chunk]], list[dict]]  # runs every chunk somewhere, returns their stats in order


class Items(Sequence):
    """Every (sha, file) to scan: the pool's candidates, first of each sha, then evaluation images not in
    it. The pairs are made when read; a list of them held ~0.2 kB per image for the whole run."""

    def __init__(self, cands: list[sources.Candidate], extra: list[tuple[str, str]]):
        seen: set[str] = set()
        self._cands = [x for x in cands if not (x.sha in seen or seen.add(x.sha))]
        self._extra = [x for x in extra if x[0] not in seen]

    @property
    def pool(self) -> int:
        """How many of the items are the pool's (they come first)."""
        return len(self._cands)

    def __len__(self) -> int:
        return len(self._cands) + len(self._extra)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i < len(self._cands):
            x = self._cands[i]
            return x.sha, str(x.file)
        return self._extra[i - len(self._cands)]


@dataclass
class Job:
    """What the scan and the steps of one curate run share."""

    cfg: RunConfig
    rd: RunDir
    src: sources.Sources
    embedder: Any
    ctx: Context
    items: Items                   # every (sha, file) to scan: the pool, then evaluation images not in it

    @property
    def pool(self) -> int:
        return self.items.pool

    @property
    def cache(self) -> Path:
        return self.rd.curate / "cache"


def prepare(cfg: RunConfig) -> Job:
    """Check the input, load the sources, build the embedder, open the caches (refusing bad settings
    before any work)."""
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
    items = Items(src.cands, ev)
    log.info("curate: %d candidate images (%d unique files) in %d classes; embedder %s",
             len(src.cands), items.pool, len(classes), embedder.key)
    return Job(cfg, rd, src, embedder, ctx, items)


def _here(job: Job) -> MapChunks:
    """Every chunk in this process, one after another, under one progress bar."""

    def run(chunks: list[Chunk]) -> list[dict]:
        from tqdm.auto import tqdm  # a progress bar only when there is work

        with tqdm(total=sum(len(ch.items) for ch in chunks), desc="curate: decode+embed", unit="img",
                  disable=None) as bar:
            return [scan_chunk(ch, job.cfg.curate, job.embedder, bar.update) for ch in chunks]

    return run


def _unfinished(chunks: list[Chunk], ctx: Context, tag: str) -> list[Chunk]:
    def done(sha: str, embed: bool) -> bool:
        f = ctx.facts.rows.get(sha)
        if f is None or not (f.get("decode") == tag or f.get("missing")):
            return False
        return not (embed and f.get("ok")) or sha in ctx.emb

    return [ch for ch in chunks if not all(done(s, e) for s, _, e in ch.items)]


def run_scan(job: Job, map_chunks: Optional[MapChunks] = None) -> dict:
    """Scan what the caches lack, in chunks (here, or through ``map_chunks``), and merge the results into
    the caches; returns the scan's stats for the manifest."""
    c, ctx = job.cfg.curate, job.ctx
    absorb_parts(job.cache, ctx.facts, ctx.emb)  # what chunks of a killed run finished
    chunks = plan_chunks(job.items, c, job.embedder, ctx.facts, ctx.emb, job.cache, ctx.classes)
    computed = sum(len(ch.items) for ch in chunks)
    stats: dict[str, Any] = {"computed": computed, "cached": len(job.items) - computed, "chunks": len(chunks)}
    if not chunks:
        return stats
    t0 = time.perf_counter()
    results = (map_chunks or _here(job))(chunks)
    absorb_parts(job.cache, ctx.facts, ctx.emb)
    left = _unfinished(chunks, ctx, decode_tag(job.embedder))
    if left:
        raise DataError(f"curate: {len(left)} of {len(chunks)} scan chunks (first: {left[0].index + 1}, "
                        f"{left[0].id}) left no results under {job.cache.absolute()}: every worker must see the "
                        f"run directory at the same path (shared storage)")
    wall = time.perf_counter() - t0
    stats.update(wall_s=round(wall, 3), model_s=round(sum(r.get("model_s", 0.0) for r in results), 3),
                 img_per_s=round(computed / wall, 2) if wall > 0 else None)
    return stats


def plant(job: Job, map_chunks: Optional[MapChunks] = None) -> int:
    """Embed the planted copies the calibrated near-dup cut measures (here, or as one more chunk where the
    scan's chunks ran: the copies and their originals are embedded on the same kind of device)."""
    ctx = job.ctx
    ok = [x for x in job.items[:job.pool] if ctx.facts.rows.get(x[0], {}).get("ok")]
    if map_chunks is None:
        return plant_copies(ok, job.embedder, ctx.emb, job.cfg.curate)
    todo = planted_sample(ok)
    if all(COPY_PREFIX + s in ctx.emb for s, _ in todo):
        return 0
    key = cache_key(job.embedder)
    cid = hashlib.sha256(json.dumps(["planted", key, [s for s, _ in todo]]).encode()).hexdigest()[:16]
    chunk = Chunk(0, 1, cid, key, str(job.cache.absolute()), list(ctx.classes),
                  [(s, str(Path(p).absolute()), True) for s, p in todo], kind="planted")
    (result,) = map_chunks([chunk])
    ctx.emb.refresh()
    if not all(COPY_PREFIX + s in ctx.emb for s, _ in todo):
        raise DataError(f"curate: the planted-copies chunk left no results under {job.cache.absolute()}: every "
                        f"worker must see the run directory at the same path (shared storage)")
    return int(result.get("planted", 0))


def decide(job: Job, embed_stats: dict, t_start: float) -> dict[str, Any]:
    """The reduce: the facts table, every step, the outputs; returns the manifest."""
    cfg, ctx, src, embedder = job.cfg, job.ctx, job.src, job.embedder
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
    manifest = write_all(cfg, job.rd, rows, src, ctx, embedder, stats, embed_stats, t_start)
    print_summary(manifest, rows)
    return manifest


def curate(cfg: RunConfig, map_chunks: Optional[MapChunks] = None) -> dict[str, Any]:
    """Run the curate stage on ``cfg.run_dir``; return the manifest dict. ``map_chunks`` runs the scan's
    chunks elsewhere (each through :func:`run_chunk`); by default they run here."""
    t_start = time.perf_counter()
    job = prepare(cfg)
    embed_stats = run_scan(job, map_chunks)
    if near_dedup.wants_planted_copies(cfg.curate):
        embed_stats["planted_copies"] = plant(job, map_chunks)
    return decide(job, embed_stats, t_start)


# ---------------------------------------------------------------- a chunk on another process or machine

_BUILT: dict[tuple, Any] = {}  # this process's embedder, reused by the chunks that run here
_BUILT_LOCK = threading.Lock()


def worker_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model files as absolute paths, for workers whose working directory differs."""
    c = cfg.curate
    curate_ = c.model_copy(update={"clip_weights": Path(c.clip_weights).absolute()}) if c.clip_weights else c
    return cfg.model_copy(update={"curate": curate_,
                                  "teacher": Path(cfg.teacher).absolute() if cfg.teacher else None})


def run_chunk(cfg: RunConfig, chunk: Chunk) -> dict:
    """One scan chunk on a worker (a Dask process, maybe with a GPU: the embedder picks its device as
    ``curate.device`` says). Writes only the chunk's own files; takes no lock (the run that planned the
    chunk holds it)."""
    c = cfg.curate
    want = (chunk.key, c.device, c.embed_backend, tuple(chunk.classes))
    with _BUILT_LOCK:
        embedder = _BUILT.get(want)
        if embedder is None:
            _BUILT.clear()  # one model per process
            embedder = _BUILT[want] = make_embedder(c, chunk.classes, cfg.teacher)
    log.info("curate: %s chunk %d/%d (%d images) on %s", chunk.kind, chunk.index + 1, chunk.total,
             len(chunk.items), getattr(embedder, "device", "?"))
    if chunk.kind == "planted":
        check_key(chunk, embedder)
        own = EmbeddingCache(Path(chunk.cache), chunk.key, part_prefix=f"part-{chunk.id}-")
        return {"chunk": chunk.id, "planted": plant_copies([(s, Path(p)) for s, p, _ in chunk.items], embedder, own, c)}
    return scan_chunk(chunk, c, embedder)
