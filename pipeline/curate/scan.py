"""The expensive pass of curate, run once per image sha256: read, decode (facts), pHash + thumbnail, embed.

Each file is decoded once, at the working size the embedder needs (a large JPEG at reduced scale inside
libjpeg, :func:`.validate.inspect_image`); the pHash, the 16x16 thumbnail and the embedder's input all
come from that one image. Decoding and hashing run in a thread pool ahead of the model (bounded prefetch
window), so they overlap inference. Results are cached under ``curate/cache/``: ``facts.jsonl`` (this
module) and the embedding parts (:class:`pipeline.curate.embed.EmbeddingCache`), so a rerun only
re-decides. Both carry the decode tag (:func:`decode_tag`): values computed another way (an older kd3
decoded every file at full size) are recomputed, never mixed with these.

The pass runs in chunks (:func:`plan_chunks`, ``curate.scan_chunk`` images each, in sha256 order), one
after another in-process or as tasks on other machines (the curate flow on Dask). A chunk writes only
files of its own (:func:`scan_chunk`: a facts file under ``cache/facts-parts/`` and its embedding parts,
each row and part complete when it is there); the run that holds the run directory's lock merges them
into the caches (:func:`absorb_parts`). A killed chunk leaves its finished rows and batches, which the
rerun keeps.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipeline.core.errors import DataError
from pipeline.core.io import JsonlAppender, iter_jsonl, read_jsonl

from .embed import EmbeddingCache
from .hashing import facts_of
from .shards import bounded_map
from .validate import MIN_WORK_SIDE, inspect_image

SCAN_VERSION = 2  # 1 (kd3 <= 0.2): every file decoded at full size; 2: decoded at the working size


def work_side(embedder) -> Optional[int]:
    """The shorter side images are decoded to for ``embedder`` (None: its input size is unknown, full size)."""
    side = getattr(embedder, "input_side", None)
    return max(int(side), MIN_WORK_SIDE) if side else None


def decode_tag(embedder) -> str:
    """How the facts and embeddings of a scan were computed; part of both caches' keys."""
    side = work_side(embedder)
    return f"v{SCAN_VERSION}:" + (f"side{side}" if side else "full")


def cache_key(embedder) -> str:
    """The embedding cache's key: the model and its weights, and how its input was decoded."""
    return f"{embedder.key}|{decode_tag(embedder)}"


class FactRows:
    """sha256 -> facts row, held as compact JSON text and decoded when read: the values only, as a list that
    names its keys by number (every row repeats the same dozen keys), and without the sha the row is filed
    under. About a quarter of the memory of the dicts, which matters at 10^5-10^6 images. A row read is a
    fresh dict, equal to the one stored (same keys, same order); to change one, assign it back."""

    def __init__(self) -> None:
        self._text: dict[str, str] = {}
        self._schemas: list[tuple[tuple[str, ...], int]] = []  # (keys, where "sha" is the row's own key or -1)
        self._schema_ids: dict[tuple[tuple[str, ...], int], int] = {}

    def __setitem__(self, sha: str, row: dict) -> None:
        keys = tuple(row)
        own = keys.index("sha") if row.get("sha") == sha else -1
        schema = (keys, own)
        sid = self._schema_ids.get(schema)
        if sid is None:
            sid = self._schema_ids[schema] = len(self._schemas)
            self._schemas.append(schema)
        values = [sid] + [None if k == own else row[key] for k, key in enumerate(keys)]
        self._text[sys.intern(sha)] = json.dumps(values, separators=(",", ":"))

    def _decode(self, sha: str, text: str) -> dict:
        values = json.loads(text)
        keys, own = self._schemas[values[0]]
        row = dict(zip(keys, values[1:]))
        if own >= 0:
            row["sha"] = sha
        return row

    def __getitem__(self, sha: str) -> dict:
        return self._decode(sha, self._text[sha])

    def get(self, sha: str, default=None):
        text = self._text.get(sha)
        return default if text is None else self._decode(sha, text)

    def __contains__(self, sha: object) -> bool:
        return sha in self._text

    def __len__(self) -> int:
        return len(self._text)


class FactsCache:
    """``curate/cache/facts.jsonl``: per sha the decode facts + pHash (append-only, last row wins)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = FactRows()
        for r in iter_jsonl(path):
            if "sha" in r:
                self.rows[r["sha"]] = r
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


def _needs_work(sha: str, facts: FactsCache, emb_cache, max_pixels: int, tag: str) -> bool:
    f = facts.rows.get(sha)
    if f is None or f.get("decode") != tag:  # never seen, or its facts were computed another way
        return True
    if f.get("bomb"):
        return 0 < f.get("pixels", 0) <= max_pixels  # cap raised above it: decode now
    if f.get("ok"):
        return sha not in emb_cache or not f.get("thumb")  # a cache from before thumbnails: decode again
    return False


def _worker(embedder, max_pixels: int):
    side, tag = work_side(embedder), decode_tag(embedder)

    def work(item):
        sha, path = item
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return sha, {"sha": sha, "ok": False, "error": f"unreadable: {e.strerror or e}", "missing": True}, None
        f, rgb = inspect_image(data, max_pixels, side)
        row = {"sha": sha, **f.to_row(), "phash": None, "decode": tag}
        if rgb is None:
            return sha, row, None
        row.update(facts_of(rgb))
        return sha, row, embedder.prepare(rgb)

    return work


class _Batcher:
    """Collects preprocessed images and embeds them ``batch_size`` at a time into the cache."""

    def __init__(self, embedder, emb_cache, batch_size: int):
        self.embedder, self.emb_cache, self.bs = embedder, emb_cache, batch_size
        self.ids: list[str] = []
        self.xs: list = []
        self.model_s = 0.0

    def add(self, sha: str, x) -> None:
        if sha in self.emb_cache:  # decoded again only for a missing fact
            return
        self.ids.append(sha)
        self.xs.append(x)
        if len(self.xs) >= self.bs:
            self.flush()

    def flush(self) -> None:
        if not self.xs:
            return
        t0 = time.perf_counter()
        emb, extra = self.embedder.embed(self.embedder.collate(self.xs))
        self.model_s += time.perf_counter() - t0
        self.emb_cache.add_part(self.ids, emb, extra)
        self.ids, self.xs = [], []


# ---------------------------------------------------------------- the scan in chunks

FACTS_PARTS = "facts-parts"  # under curate/cache/: one facts file per chunk, merged into facts.jsonl by the driver


@dataclass
class Chunk:
    """One unit of the scan, run anywhere that sees the run directory at the same path: ``items`` are
    (sha256, absolute file path, embed?) in sha order; its results go to its own files under ``cache``
    (``facts-parts/<id>.jsonl`` and ``emb-<key hash>/part-<id>-*.npz``), never to the shared caches."""

    index: int          # 0-based, of ``total``
    total: int
    id: str             # content hash of what it computes (model key, decode tag, pixel cap, shas)
    key: str            # the embedding cache key the planner expects (scan.cache_key)
    cache: str          # absolute path of curate/cache
    classes: list[str]  # what the embedder is built for (the teacher backend maps its classes)
    items: list[tuple[str, str, bool]] = field(default_factory=list)
    kind: str = "images"  # or "planted": embed the planted copies of these images (:mod:`.calibrate`)

    def facts_path(self) -> Path:
        return Path(self.cache) / FACTS_PARTS / f"{self.id}.jsonl"


def plan_chunks(items: list[tuple[str, Path]], c, embedder, facts: FactsCache, emb_cache, cache: Path,
                classes: list[str]) -> list[Chunk]:
    """The (sha, file) pairs not cached yet, in sha256 order (the chunks and their embedding batches are a
    function of the pool, not of its order), ``c.scan_chunk`` per chunk."""
    tag, key = decode_tag(embedder), cache_key(embedder)
    files: dict[str, str] = {}  # the first file of each sha to scan (the bytes are the same); cached ones not held
    for s, p in items:
        if s not in files and _needs_work(s, facts, emb_cache, c.max_pixels, tag):
            files[s] = p
    todo = sorted(files)
    groups = [todo[i:i + c.scan_chunk] for i in range(0, len(todo), c.scan_chunk)]
    root = str(Path(cache).absolute())
    out = []
    for k, shas in enumerate(groups):
        cid = hashlib.sha256(json.dumps([key, c.max_pixels, shas]).encode()).hexdigest()[:16]
        out.append(Chunk(k, len(groups), cid, key, root, list(classes),
                         [(s, str(Path(files[s]).absolute()), s not in emb_cache) for s in shas]))
    return out


def _chunk_done(item, rows: dict, own_emb, tag: str) -> bool:
    sha, _, embed = item
    r = rows.get(sha)
    if r is None or r.get("decode") != tag:
        return False
    return not (embed and r.get("ok")) or sha in own_emb


def check_key(chunk: Chunk, embedder) -> None:
    """A worker must embed with the model the plan was made for (its cache is keyed by it)."""
    if cache_key(embedder) != chunk.key:
        raise DataError(f"scan chunk {chunk.index + 1}/{chunk.total}: this worker's embedder is "
                        f"{cache_key(embedder)!r}, the plan's {chunk.key!r}: every worker needs the same "
                        f"model files (curate.clip_weights / teacher) and settings")


def scan_chunk(chunk: Chunk, c, embedder, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Decode, hash and embed one chunk into its own files; what an earlier try of it finished is kept."""
    check_key(chunk, embedder)
    tag = decode_tag(embedder)
    path = chunk.facts_path()
    own = EmbeddingCache(Path(chunk.cache), chunk.key, part_prefix=f"part-{chunk.id}-")
    done = {r["sha"]: r for r in read_jsonl(path) if "sha" in r}
    todo = [(s, p) for s, p, e in chunk.items if not _chunk_done((s, p, e), done, own, tag)]
    embed = {s for s, _, e in chunk.items if e}
    stats = {"chunk": chunk.id, "items": len(chunk.items), "computed": len(todo), "model_s": 0.0, "wall_s": 0.0}
    if progress is not None and len(todo) < len(chunk.items):
        progress(len(chunk.items) - len(todo))
    if not todo:
        return stats
    t0 = time.perf_counter()
    batch = _Batcher(embedder, own, c.batch_size)
    app = JsonlAppender(path, sync_every=256)
    try:
        for sha, row, x in bounded_map(_worker(embedder, c.max_pixels), todo, c.workers, max(2 * c.batch_size, 8)):
            app.write(row)  # an unreadable file too: the driver keeps that row in memory only
            if x is not None and sha in embed:
                batch.add(sha, x)
            if progress is not None:
                progress(1)
        batch.flush()
    finally:
        app.close()
    stats.update(model_s=round(batch.model_s, 3), wall_s=round(time.perf_counter() - t0, 3))
    return stats


def absorb_parts(cache: Path, facts: FactsCache, emb_cache) -> int:
    """Merge the chunks' facts files into ``facts.jsonl`` (then remove them) and load new embedding parts;
    only the run that holds the run directory's lock calls this. Returns the facts rows merged."""
    parts = sorted((Path(cache) / FACTS_PARTS).glob("*.jsonl"))
    n = 0
    for p in parts:
        for row in read_jsonl(p):
            if "sha" not in row:
                continue
            if row.get("missing"):
                facts.rows[row["sha"]] = row  # not cached on disk: the file may come back
            else:
                facts.add(row)
            n += 1
    facts.close()  # fsynced before the parts go
    for p in parts:
        p.unlink(missing_ok=True)
    emb_cache.refresh()
    return n
