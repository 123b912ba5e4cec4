"""The curate stage: crawl output (or a local folder) -> decisions, embeddings, index, shards, manifest.

Data flows one way through one module per step (img2dataset style):

    sources ─▶ validate ─▶ hashing (sha256, pHash) ─▶ embed ─┐   (one streaming pass, cached per sha)
                                                            ▼
    decisions: validate ▸ exact dedup ▸ decontaminate ▸ relevance ▸ pHash dedup ▸ near-dup   (pure, fast)
                                                            ▼
    index (kept embeddings) ─▶ shards (atomic tars) ─▶ decisions.jsonl ─▶ manifest.json (last)

The expensive pass (read, decode, hash, embed) is cached under ``curate/cache/`` keyed by image
sha256 (+ embedding model), so a rerun after a crash or with other thresholds only re-decides.
"""
from __future__ import annotations

import logging
import time
import urllib.parse
from collections import Counter, defaultdict, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import RunConfig
from .errors import ConfigError, DataError
from .io import JsonlAppender, atomic_path, atomic_write_json, read_jsonl, sha256_file, write_jsonl_atomic
from .runs import RunDir

log = logging.getLogger("pipeline.curate")


@dataclass
class Candidate:
    cls: str
    label: int
    sha: str
    path: str      # as recorded (relative to the run dir) or an absolute path for folder sources
    file: Path     # where to read it
    url: str
    order: int


# ---------------------------------------------------------------- sources

def _load_from_records(rd: RunDir, classes: list[str]) -> tuple[list[Candidate], dict]:
    rows = read_jsonl(rd.records)
    ok = [r for r in rows if r.get("status") == "ok" and r.get("sha256") and r.get("path")]
    cidx = {c: i for i, c in enumerate(classes)}
    seen: set[tuple[str, str]] = set()
    out: list[Candidate] = []
    unknown: Counter = Counter()
    collapsed = 0
    for r in ok:
        c = r.get("class")
        if c not in cidx:
            unknown[c] += 1
            continue
        k = (c, r["sha256"])
        if k in seen:
            collapsed += 1
            continue
        seen.add(k)
        out.append(Candidate(c, cidx[c], r["sha256"], r["path"], rd.root / r["path"], r.get("url") or "", len(out)))
    for c, n in unknown.items():
        log.warning("curate: %d records of class %r, which is not in the class list, are ignored", n, c)
    return out, {"records": len(rows), "ok": len(ok), "collapsed": collapsed}


def _load_from_folder(folder: Path, classes: list[str]) -> tuple[list[Candidate], dict]:
    from .decontam import IMAGE_EXTS
    from .slug import slugify

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"crawl.folder {folder} is not a folder")
    out: list[Candidate] = []
    seen: set[tuple[str, str]] = set()
    n_files = collapsed = 0
    for label, c in enumerate(classes):
        d = folder / c
        if not d.is_dir():
            d = folder / slugify(c)
        if not d.is_dir():
            log.warning("curate: class %r has no folder under %s", c, folder)
            continue
        for p in sorted(d.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            n_files += 1
            sha = sha256_file(p)
            if (c, sha) in seen:
                collapsed += 1
                continue
            seen.add((c, sha))
            ap = p.resolve()
            out.append(Candidate(c, label, sha, str(ap), ap, ap.as_uri(), len(out)))
    return out, {"records": n_files, "ok": n_files, "collapsed": collapsed}


def _classes(cfg: RunConfig, rd: RunDir) -> list[str]:
    try:
        return cfg.resolved_classes()
    except ConfigError:
        if rd.records.exists():
            names = list(OrderedDict.fromkeys(r.get("class") for r in read_jsonl(rd.records) if r.get("class")))
            if names:
                return names
        raise


# ---------------------------------------------------------------- the streaming pass

class FactsCache:
    """``curate/cache/facts.jsonl``: per sha the decode facts + pHash (append-only, last row wins)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {r["sha"]: r for r in read_jsonl(path) if "sha" in r}
        self._app: Optional[JsonlAppender] = None

    def add(self, row: dict) -> None:
        if self._app is None:
            self._app = JsonlAppender(self.path, sync_every=256)
        self._app.write(row)
        self.rows[row["sha"]] = row

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None


def _needs_work(sha: str, facts: FactsCache, emb_cache, max_pixels: int) -> bool:
    f = facts.rows.get(sha)
    if f is None:
        return True
    if f.get("bomb"):
        return 0 < f.get("pixels", 0) <= max_pixels  # cap raised above it: decode now
    if f.get("ok"):
        return sha not in emb_cache
    return False


def _scan(items: list[tuple[str, Path]], cfg, embedder, facts: FactsCache, emb_cache, stats: dict) -> None:
    """Decode, hash and embed every (sha, file) that is not cached yet. Decoding and hashing run
    in a thread pool ahead of the model (bounded prefetch window), so they overlap inference."""
    import torch
    from tqdm.auto import tqdm

    from .hashing import phash_hex
    from .shards import bounded_map
    from .validate import inspect_image

    c = cfg.curate
    todo = [(s, p) for s, p in items if _needs_work(s, facts, emb_cache, c.max_pixels)]
    stats["computed"] = len(todo)
    stats["cached"] = len(items) - len(todo)
    if not todo:
        return

    def work(item):
        sha, path = item
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return sha, {"sha": sha, "ok": False, "error": f"unreadable: {e.strerror or e}", "missing": True}, None
        f, rgb = inspect_image(data, c.max_pixels)
        row = {"sha": sha, **f.to_row(), "phash": None}
        if rgb is None:
            return sha, row, None
        row["phash"] = phash_hex(rgb)
        x = embedder.preprocess(rgb)
        return sha, row, x

    ids: list[str] = []
    xs: list = []
    t_model = 0.0

    def flush():
        nonlocal ids, xs, t_model
        if not xs:
            return
        t0 = time.perf_counter()
        emb, extra = embedder.embed(torch.stack(xs))
        t_model += time.perf_counter() - t0
        emb_cache.add_part(ids, emb, extra)
        ids, xs = [], []

    bs = c.batch_size
    window = max(2 * bs, 8)
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc="curate: decode+embed", unit="img", disable=None) as bar:
            for sha, row, x in bounded_map(work, todo, c.workers, window):
                if not row.get("missing"):
                    facts.add(row)
                else:
                    facts.rows[sha] = row  # not cached on disk: the file may come back
                if x is not None:
                    ids.append(sha)
                    xs.append(x)
                    if len(xs) >= bs:
                        flush()
                bar.update(1)
            flush()
    finally:
        facts.close()
    wall = time.perf_counter() - t0
    stats["wall_s"] = round(wall, 3)
    stats["model_s"] = round(t_model, 3)
    stats["img_per_s"] = round(len(todo) / wall, 2) if wall > 0 else None


# ---------------------------------------------------------------- decisions

def _step(stats: dict, name: str, n_in: int, dropped: Counter) -> None:
    stats[name] = {"in": n_in, "out": n_in - sum(dropped.values()), "dropped": dict(dropped)}


def _drop(row: dict, reason: str, detail: str = "", dup_of: Optional[str] = None) -> None:
    row["kept"] = False
    row["reason"] = reason
    row["detail"] = detail
    row["dup_of"] = dup_of


def curate(cfg: RunConfig) -> dict[str, Any]:
    """Run the curate stage on ``cfg.run_dir``; return the manifest dict."""
    from . import decontam as dc
    from .config import save_resolved
    from .embed import EmbeddingCache, make_embedder
    from .hashing import phash_groups
    from .index import build_index, index_kind, save_index
    from .manifest import build_manifest, write_manifest
    from .neardup import near_dup_groups, pick_representatives
    from .relevance import check_filter_allowed, label_embeddings, label_names, off_class, zero_shot
    from .shards import Sample, write_shards
    from .validate import size_reason

    t_start = time.perf_counter()
    c = cfg.curate
    rd = RunDir(cfg.run_dir)
    if not rd.root.is_dir():
        raise DataError(f"run directory {rd.root} does not exist")
    classes = _classes(cfg, rd)

    if rd.records.exists():
        cands, src = _load_from_records(rd, classes)
        where = str(rd.records)
    elif cfg.crawl.folder is not None:
        cands, src = _load_from_folder(cfg.crawl.folder, classes)
        where = f"crawl.folder {cfg.crawl.folder}"
    else:
        raise DataError(f"{rd.records} is missing: run `kd3 crawl` on {rd.root} first (or set crawl.folder)")
    if not cands:
        raise DataError(f"{where}: no usable images (status ok) for classes {classes}: nothing to curate")

    embedder = make_embedder(c, classes, cfg.teacher)
    check_filter_allowed(embedder, c.relevance_filter)  # refuse before any work
    rd.curate.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg)
    cache_dir = rd.curate / "cache"
    facts = FactsCache(cache_dir / "facts.jsonl")
    emb_cache = EmbeddingCache(cache_dir, embedder.key)

    # eval images for decontamination go through the same cached pass
    ev_files = dc.eval_files(c.decontaminate) if c.decontaminate is not None else []

    stats: dict[str, Any] = {}
    uniq = list(OrderedDict((x.sha, x.file) for x in cands).items())
    ev_uniq = [(s, p) for s, p in OrderedDict(ev_files).items()]
    embed_stats: dict[str, Any] = {}
    log.info("curate: %d candidate images (%d unique files) in %d classes; embedder %s",
             len(cands), len(uniq), len(classes), embedder.key)
    web_shas = {s for s, _ in uniq}
    _scan(uniq + [x for x in ev_uniq if x[0] not in web_shas], cfg, embedder, facts, emb_cache, embed_stats)

    rows: list[dict] = []
    for x in cands:
        f = facts.rows.get(x.sha, {})
        rows.append({"id": x.sha, "class": x.cls, "label": x.label, "path": x.path, "url": x.url,
                     "kept": True, "reason": None, "detail": "", "dup_of": None,
                     "w": int(f.get("w") or 0), "h": int(f.get("h") or 0), "phash": f.get("phash"),
                     "clip_scores": None, "clip_top": None, "teacher_conf": None, "shard": None, "key": None})
    stats["records"] = {"in": src["records"], "out": src["ok"], "dropped": {"not_ok": src["records"] - src["ok"]}}

    # 1. validate
    dropped = Counter()
    for x, r in zip(cands, rows):
        f = facts.rows.get(x.sha)
        if f is None or (not f.get("ok") and not f.get("bomb")):
            _drop(r, "invalid", (f or {}).get("error") or "not decoded")
        elif f.get("bomb") or f.get("pixels", 0) > c.max_pixels:
            _drop(r, "bomb", f.get("error") or f"{f.get('pixels')} pixels > cap {c.max_pixels}")
        else:
            reason, detail = size_reason(r["w"], r["h"], c.min_side, c.max_aspect)
            if reason:
                _drop(r, reason, detail)
        if not r["kept"]:
            dropped[r["reason"]] += 1
    _step(stats, "validate", len(rows), dropped)

    # scores for every image with an embedding (relevance needs them; cross-class ties use them)
    has_emb = [r["id"] in emb_cache for r in rows]
    emb_rows = [i for i, h in enumerate(has_emb) if h]
    label_scores: dict[int, np.ndarray] = {}
    names = label_names(classes, c.negative_prompts if embedder.has_text else None)
    if emb_rows:
        E = emb_cache.matrix([rows[i]["id"] for i in emb_rows])
        if embedder.has_text:
            L = label_embeddings(embedder, classes, c.prompt_templates, c.negative_prompts)
            P = zero_shot(E, L, embedder.logit_scale())
            for k, i in enumerate(emb_rows):
                label_scores[i] = P[k]
                rows[i]["clip_scores"] = [round(float(v), 6) for v in P[k, :len(classes)]]
                rows[i]["clip_top"] = names[int(np.argmax(P[k]))]
        else:
            cmap = getattr(embedder, "class_map", [])
            for i in emb_rows:
                probs = emb_cache.extra.get(rows[i]["id"])
                if probs is None:
                    continue
                mapped = np.array([probs[j] if j is not None else 0.0 for j in cmap], np.float32)
                label_scores[i] = mapped
                rows[i]["teacher_conf"] = round(float(mapped[rows[i]["label"]]), 6)
        del E
    trusted = embedder.trained and bool(label_scores)

    def alive() -> list[int]:
        return [i for i, r in enumerate(rows) if r["kept"]]

    # 2a. exact dedup across classes (same file under several classes: keep one)
    dropped = Counter({"exact_dup": src["collapsed"]}) if src["collapsed"] else Counter()
    n_in = len(alive()) + src["collapsed"]
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i in alive():
        by_sha[rows[i]["id"]].append(i)
    for sha, idx in by_sha.items():
        if len(idx) < 2:
            continue
        if trusted:
            win = max(idx, key=lambda i: (float(label_scores[i][rows[i]["label"]]) if i in label_scores else -1, -i))
        else:
            win = idx[0]
        for i in idx:
            if i != win:
                _drop(rows[i], "cross_class_dup", f"same file kept under class {rows[win]['class']!r}", sha)
                dropped["cross_class_dup"] += 1
    _step(stats, "exact_dedup", n_in, dropped)

    # 2b. decontaminate
    if c.decontaminate is not None:
        ev_ok = [(s, p) for s, p in ev_uniq if facts.rows.get(s, {}).get("ok")]
        bad = len(ev_uniq) - len(ev_ok)
        if bad:
            log.warning("curate: %d evaluation images under %s do not decode and are not used", bad, c.decontaminate)
        if not ev_ok:
            log.warning("curate: no decodable evaluation images under %s: nothing to decontaminate against",
                        c.decontaminate)
        ids = alive()
        ev_sha = [s for s, _ in ev_ok]
        ev_ph = [facts.rows[s]["phash"] for s in ev_sha]
        ev_emb = emb_cache.matrix([s for s in ev_sha if s in emb_cache]) if ev_sha else None
        ev_emb_sha = [s for s in ev_sha if s in emb_cache]
        web_sha = [rows[i]["id"] for i in ids]
        web_ph = [rows[i]["phash"] for i in ids]
        web_emb = emb_cache.matrix(web_sha) if web_sha else None
        # exact + pHash against all eval images, embeddings against those embedded
        m1 = dc.match(web_sha, web_ph, None, ev_sha, ev_ph, None, c.phash_threshold, c.decontam_threshold)
        m2 = dc.match(web_sha, [], web_emb, ev_emb_sha, [], ev_emb, c.phash_threshold, c.decontam_threshold) \
            if ev_emb_sha else [None] * len(ids)
        dropped = Counter()
        for k, i in enumerate(ids):
            m = m1[k] or m2[k]
            if m:
                _drop(rows[i], "contaminated", f"{m[0]} match of evaluation image {m[1][:16]}", None)
                dropped["contaminated"] += 1
        _step(stats, "decontaminate", len(ids), dropped)
        stats["decontaminate"]["eval_images"] = len(ev_ok)

    # 3. relevance (optional filter; scores are stored either way)
    ids = alive()
    dropped = Counter()
    if c.relevance_filter and label_scores:
        for i in ids:
            if i not in label_scores:
                continue
            drop, top = off_class(label_scores[i], rows[i]["label"], c.relevance_margin)
            if drop:
                s = label_scores[i]
                _drop(rows[i], "off_class",
                      f"top {names[top]!r} {s[top]:.3f} > {rows[i]['class']!r} {s[rows[i]['label']]:.3f} "
                      f"+ {c.relevance_margin}")
                dropped["off_class"] += 1
    _step(stats, "relevance", len(ids), dropped)
    stats["relevance"]["filter"] = bool(c.relevance_filter)

    def _dedup(step: str, ids: list[int], labels, reason: str, what: str) -> None:
        prio = np.array([rows[i]["w"] * rows[i]["h"] for i in ids], dtype=np.float64)
        rep = pick_representatives(np.asarray(labels), prio)
        dropped = Counter()
        for k, i in enumerate(ids):
            j = ids[int(rep[k])]
            if j == i:
                continue
            cross = rows[j]["class"] != rows[i]["class"]
            why = "cross_class_dup" if cross else reason
            _drop(rows[i], why, f"{what} of {rows[j]['id'][:16]} ({rows[j]['class']}, "
                                f"{rows[j]['w']}x{rows[j]['h']})", rows[j]["id"])
            dropped[why] += 1
        _step(stats, step, len(ids), dropped)

    # 4. pHash dedup (within and across classes)
    ids = alive()
    _dedup("phash_dedup", ids, phash_groups([rows[i]["phash"] for i in ids], c.phash_threshold)
           if ids else np.zeros(0, int), "phash_dup", f"pHash <= {c.phash_threshold}")

    # 5. semantic near-duplicates
    ids = alive()
    ids_e = [i for i in ids if rows[i]["id"] in emb_cache]
    if ids_e:
        E = emb_cache.matrix([rows[i]["id"] for i in ids_e])
        labels = near_dup_groups(E, c.near_dup_threshold)
        del E
    else:
        labels = np.zeros(0, int)
    _dedup("near_dedup", ids_e, labels, "near_dup", f"cosine >= {c.near_dup_threshold}")

    kept = alive()
    counts = Counter(rows[i]["class"] for i in kept)
    for cl in classes:
        if counts.get(cl, 0) == 0:
            log.warning("curate: class %r has no kept images", cl)

    # outputs: embeddings of every embedded candidate image, index of the kept ones
    all_ids = [s for s, _ in uniq if s in emb_cache]
    E_all = emb_cache.matrix(all_ids) if all_ids else np.zeros((0, embedder.dim), np.float32)
    with atomic_path(rd.embeddings) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, E_all)
    atomic_write_json(rd.embedding_ids, all_ids, indent=None)
    del E_all
    kept_ids = [rows[i]["id"] for i in kept if rows[i]["id"] in emb_cache]
    index = build_index(emb_cache.matrix(kept_ids) if kept_ids else np.zeros((0, embedder.dim), np.float32))
    save_index(index, kept_ids, rd.index, rd.index_ids)

    # shards (kept samples ordered by key = sha: classes interleaved, deterministic)
    def meta(r: dict) -> dict:
        if r["clip_scores"] is not None:
            scores = {cl: r["clip_scores"][k] for k, cl in enumerate(classes)}
        else:
            scores = {}
        m = {"class": r["class"], "label": r["label"], "url": r["url"], "sha256": r["id"], "w": r["w"], "h": r["h"],
             "scores": scores}
        if r["teacher_conf"] is not None:
            m["teacher_conf"] = r["teacher_conf"]
        return m

    order = sorted(kept, key=lambda i: rows[i]["id"])
    samples = []
    for i in order:
        r = rows[i]
        key = r["id"][:16]
        samples.append(Sample(key, meta(r), r["label"], cands[i].file, Path(cands[i].path).suffix))
    if len({s.key for s in samples}) != len(samples):
        raise DataError("two kept images share a 16-hex key prefix (sha256 collision?)")

    def on_change():
        if rd.manifest.exists():
            rd.manifest.unlink()  # the old manifest no longer matches the shards being rewritten

    shardlist, key_to_shard, reused = write_shards(
        samples, rd.shards, cfg.name, rd.curate / "shards_state.json",
        image_format=c.image_format, max_side=c.max_side, jpeg_quality=c.jpeg_quality, max_pixels=c.max_pixels,
        max_samples=c.shard_max_samples, max_bytes=c.shard_max_bytes, workers=c.workers, on_change=on_change)
    for i in kept:
        rows[i]["key"] = rows[i]["id"][:16]
        rows[i]["shard"] = key_to_shard.get(rows[i]["key"])
    stats["shards"] = {"in": len(samples), "out": sum(s["nsamples"] for s in shardlist), "dropped": {},
                       "shards": len(shardlist), "reused": reused}
    emb_info = embedder.info()
    stats["embed"] = {"in": len(uniq), "out": len(all_ids), "dropped": {}, **embed_stats}
    write_jsonl_atomic(rd.decisions, rows)

    thresholds = {k: getattr(c, k) for k in (
        "min_side", "max_aspect", "max_pixels", "phash_threshold", "near_dup_threshold", "relevance_filter",
        "relevance_margin", "decontam_threshold", "image_format", "max_side", "jpeg_quality",
        "shard_max_samples", "shard_max_bytes")}
    thresholds["decontaminate"] = str(c.decontaminate) if c.decontaminate else None
    manifest = build_manifest(
        name=cfg.name, shardlist=shardlist, classes=classes,
        class_counts={cl: counts.get(cl, 0) for cl in classes}, stats=stats,
        embedding={k: emb_info[k] for k in ("backend", "model", "pretrained", "dim", "trained")},
        thresholds=thresholds, config_hash=cfg.config_hash(),
        extra={"index": {"path": "curate/index.faiss", "ids": "curate/index_ids.json", "kind": index_kind(index),
                         "n": len(kept_ids)},
               "elapsed_s": round(time.perf_counter() - t_start, 3)})
    write_manifest(rd.manifest, manifest)
    _summary(manifest)
    return manifest


def _summary(m: dict) -> None:
    """Per-step counts as a rich table (stderr) and one log line per step."""
    order = ["records", "validate", "exact_dedup", "decontaminate", "relevance", "phash_dedup", "near_dedup",
             "shards"]
    for step in order:
        s = m["stats"].get(step)
        if s:
            log.info("curate %-14s in %6d  out %6d  %s", step, s["in"], s["out"],
                     ", ".join(f"{k}={v}" for k, v in s["dropped"].items() if v) or "-")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"kd3 curate: {m['name']} — {m['nsamples']} samples in {len(m['shardlist'])} shards")
        for col in ("step", "in", "out", "dropped (why)"):
            t.add_column(col, justify="right" if col in ("in", "out") else "left")
        for step in order:
            s = m["stats"].get(step)
            if s:
                t.add_row(step, str(s["in"]), str(s["out"]),
                          ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v) or "")
        e = m["stats"].get("embed", {})
        t.add_row("embed", str(e.get("in", "")), str(e.get("out", "")),
                  f"computed {e.get('computed', 0)}, cached {e.get('cached', 0)}")
        Console(stderr=True).print(t)
    except Exception:  # pragma: no cover - the table is a nicety
        pass
