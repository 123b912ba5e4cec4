"""What curate writes once the steps have decided: embeddings, the FAISS index of the kept images,
the shards, ``decisions.jsonl`` and, last, ``manifest.json`` (formats: :mod:`pipeline.core.records`)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.core.errors import DataError
from pipeline.core.records import Decision, build_manifest, write_decisions, write_embeddings, write_index, \
    write_manifest
from pipeline.core.runs import RunDir

from .index import build_index, index_kind
from .shards import Sample, write_shards
from .sources import Sources
from .table import Context

log = logging.getLogger("kd3.curate")

THRESHOLDS = ("min_side", "max_aspect", "max_pixels", "phash_threshold", "near_dup_threshold", "relevance_filter",
              "relevance_margin", "decontam_threshold", "image_format", "max_side", "jpeg_quality",
              "shard_max_samples", "shard_max_bytes")
STEP_ORDER = ("records", "validate", "exact_dedup", "decontaminate", "relevance", "phash_dedup", "near_dedup",
              "shards")


def write_vectors(rd: RunDir, ctx: Context, uniq_shas: list[str], kept_shas: list[str], dim: int):
    """Embeddings of every embedded candidate (``curate/embeddings.npy``), index of the kept ones."""
    all_ids = [s for s in uniq_shas if s in ctx.emb]
    write_embeddings(rd.embeddings, rd.embedding_ids, all_ids,
                     ctx.emb.matrix(all_ids) if all_ids else np.zeros((0, dim), np.float32))
    kept_ids = [s for s in kept_shas if s in ctx.emb]
    index = build_index(ctx.emb.matrix(kept_ids) if kept_ids else np.zeros((0, dim), np.float32))
    write_index(index, kept_ids, rd.index, rd.index_ids)
    return index, all_ids, kept_ids


def _sample_meta(r: Decision, classes: list[str]) -> dict:
    scores = {cl: r.clip_scores[k] for k, cl in enumerate(classes)} if r.clip_scores is not None else {}
    m = {"class": r.cls, "label": r.label, "url": r.url, "sha256": r.id, "w": r.w, "h": r.h, "scores": scores}
    if r.teacher_conf is not None:
        m["teacher_conf"] = r.teacher_conf
    return m


def shard_rows(cfg, rd: RunDir, rows: list[Decision], src: Sources, classes: list[str]) -> dict:
    """Kept samples ordered by key (= sha: classes interleaved, deterministic) into shards; sets each
    kept row's ``key`` and ``shard``. Returns the shards' stats row and shard list."""
    c = cfg.curate
    kept = sorted((i for i, r in enumerate(rows) if r.kept), key=lambda i: rows[i].id)
    samples = [Sample(rows[i].id[:16], _sample_meta(rows[i], classes), rows[i].label, src.cands[i].file,
                      Path(src.cands[i].path).suffix) for i in kept]
    if len({s.key for s in samples}) != len(samples):
        raise DataError("two kept images share a 16-hex key prefix (sha256 collision?)")

    def on_change():
        if rd.manifest.exists():
            rd.manifest.unlink()  # the old manifest no longer matches the shards being rewritten

    shardlist, key_to_shard, reused = write_shards(
        samples, rd.shards, cfg.name, rd.curate / "shards_state.json",
        image_format=c.image_format, max_side=c.max_side, jpeg_quality=c.jpeg_quality, max_pixels=c.max_pixels,
        max_samples=c.shard_max_samples, max_bytes=c.shard_max_bytes, workers=c.workers, on_change=on_change)
    for r in rows:
        if r.kept:
            r.key = r.id[:16]
            r.shard = key_to_shard.get(r.key)
    return {"shardlist": shardlist, "stats": {"in": len(samples), "out": sum(s["nsamples"] for s in shardlist),
                                              "dropped": {}, "shards": len(shardlist), "reused": reused}}


def write_all(cfg, rd: RunDir, rows: list[Decision], src: Sources, ctx: Context, embedder, stats: dict,
              embed_stats: dict, t_start: float) -> dict[str, Any]:
    """Every output, the manifest last (a crash never leaves a manifest listing an unfinished shard)."""
    c, classes = cfg.curate, ctx.classes
    counts = Counter(r.cls for r in rows if r.kept)
    for cl in classes:
        if counts.get(cl, 0) == 0:
            log.warning("curate: class %r has no kept images", cl)
    uniq = list(dict.fromkeys(x.sha for x in src.cands))
    index, all_ids, kept_ids = write_vectors(rd, ctx, uniq, [r.id for r in rows if r.kept], embedder.dim)
    sh = shard_rows(cfg, rd, rows, src, classes)
    stats["shards"] = sh["stats"]
    stats["embed"] = {"in": len(uniq), "out": len(all_ids), "dropped": {}, **embed_stats}
    write_decisions(rd.decisions, rows)
    thresholds = {k: getattr(c, k) for k in THRESHOLDS}
    thresholds["decontaminate"] = str(c.decontaminate) if c.decontaminate else None
    emb_info = embedder.info()
    manifest = build_manifest(
        name=cfg.name, shardlist=sh["shardlist"], classes=classes,
        class_counts={cl: counts.get(cl, 0) for cl in classes}, stats=stats,
        embedding={k: emb_info[k] for k in ("backend", "model", "pretrained", "dim", "trained")},
        thresholds=thresholds, config_hash=cfg.config_hash(),
        extra={"index": {"path": "curate/index.faiss", "ids": "curate/index_ids.json", "kind": index_kind(index),
                         "n": len(kept_ids)},
               "elapsed_s": round(time.perf_counter() - t_start, 3)})
    write_manifest(rd.manifest, manifest)
    return manifest


STEP_FLAG_SHARE = 0.2     # a step dropping more than this share of its input is flagged
CLASS_FLAG_SHARE = 0.2    # a class losing more than this, and more than twice the pool's share, is flagged


def drop_shares(m: dict, rows: list[Decision]) -> dict:
    """What share each step dropped of its input and each class of its images, with flags on the unusual:
    a step above ``STEP_FLAG_SHARE``; a class above ``CLASS_FLAG_SHARE`` and twice the pool's own share
    (the class a threshold hits hardest is the one to look at), or with nothing kept."""
    steps = []
    for step in STEP_ORDER:
        s = m["stats"].get(step)
        if s:
            n = sum(s["dropped"].values())
            share = n / s["in"] if s["in"] else 0.0
            steps.append({"step": step, "in": s["in"], "out": s["out"], "dropped": s["dropped"], "share": share,
                          "flag": share > STEP_FLAG_SHARE})
    per: dict[str, Counter] = {c: Counter() for c in m["classes"]}
    for r in rows:
        per.setdefault(r.cls, Counter())["rows"] += 1
        if not r.kept:
            per[r.cls][r.reason.value] += 1
    total = sum(c["rows"] for c in per.values())
    pool_share = sum(sum(v for k, v in c.items() if k != "rows") for c in per.values()) / total if total else 0.0
    classes = []
    for c, cnt in per.items():
        n = cnt.pop("rows", 0)
        lost = sum(cnt.values())
        share = lost / n if n else 0.0
        classes.append({"class": c, "in": n, "kept": n - lost, "dropped": dict(cnt.most_common()), "share": share,
                        "flag": n == lost or (share > CLASS_FLAG_SHARE and share > 2 * pool_share)})
    return {"steps": steps, "classes": classes, "pool_share": pool_share}


def _why(dropped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in dropped.items() if v)


def print_summary(m: dict, rows: list[Decision]) -> None:
    """Per-step and per-class drop shares as rich tables (stderr), one log line per step, and a warning
    for each flagged step or class."""
    sh = drop_shares(m, rows)
    for s in sh["steps"]:
        log.info("curate %-14s in %6d  out %6d  %s", s["step"], s["in"], s["out"], _why(s["dropped"]) or "-")
        if s["flag"]:
            log.warning("curate: %s dropped %.0f%% of its input (%s): check its threshold", s["step"],
                        100 * s["share"], _why(s["dropped"]))
    for c in sh["classes"]:
        if c["flag"]:
            log.warning("curate: class %r lost %d of %d images (%.0f%%; the pool lost %.0f%%): %s", c["class"],
                        c["in"] - c["kept"], c["in"], 100 * c["share"], 100 * sh["pool_share"], _why(c["dropped"]))
    try:
        _print_tables(m, sh)
    except Exception:  # pragma: no cover - the tables are a nicety
        pass


def _share(x: dict) -> str:
    txt = f"{100 * x['share']:.0f}%"
    return f"[bold red]{txt} ![/bold red]" if x["flag"] else txt


def _print_tables(m: dict, sh: dict) -> None:
    con = Console(stderr=True)
    t = Table(title=f"kd3 curate: {m['name']} — {m['nsamples']} samples in {len(m['shardlist'])} shards")
    for col in ("step", "in", "out", "dropped", "why"):
        t.add_column(col, justify="left" if col in ("step", "why") else "right")
    for s in sh["steps"]:
        t.add_row(s["step"], str(s["in"]), str(s["out"]), _share(s), _why(s["dropped"]))
    e = m["stats"].get("embed", {})
    t.add_row("embed", str(e.get("in", "")), str(e.get("out", "")), "",
              f"computed {e.get('computed', 0)}, cached {e.get('cached', 0)}")
    con.print(t)
    c = Table(title=f"per class — the pool lost {100 * sh['pool_share']:.0f}% (! = unusual for this pool)")
    for col in ("class", "images", "kept", "dropped", "why"):
        c.add_column(col, justify="left" if col in ("class", "why") else "right")
    for x in sh["classes"]:
        c.add_row(x["class"], str(x["in"]), str(x["kept"]), _share(x), _why(x["dropped"]))
    con.print(c)
