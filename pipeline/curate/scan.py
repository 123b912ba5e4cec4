"""The expensive pass of curate, run once per image sha256: read, decode (facts), pHash + thumbnail, embed.

Each file is decoded once, at the working size the embedder needs (a large JPEG at reduced scale inside
libjpeg, :func:`.validate.inspect_image`); the pHash, the 16x16 thumbnail and the embedder's input all
come from that one image. Decoding and hashing run in a thread pool ahead of the model (bounded prefetch
window), so they overlap inference. Results are cached under ``curate/cache/``: ``facts.jsonl`` (this
module) and the embedding parts (:class:`pipeline.curate.embed.EmbeddingCache`), so a rerun only
re-decides. Both carry the decode tag (:func:`decode_tag`): values computed another way (an older kd3
decoded every file at full size) are recomputed, never mixed with these.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from pipeline.core.io import JsonlAppender, read_jsonl

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


def scan(items: list[tuple[str, Path]], c, embedder, facts: FactsCache, emb_cache, stats: dict) -> None:
    """Decode, hash and embed every (sha, file) not cached yet; ``c`` is the curate config section."""
    from tqdm.auto import tqdm  # a progress bar only when there is work

    tag = decode_tag(embedder)
    todo = [(s, p) for s, p in items if _needs_work(s, facts, emb_cache, c.max_pixels, tag)]
    stats["computed"] = len(todo)
    stats["cached"] = len(items) - len(todo)
    if not todo:
        return
    batch = _Batcher(embedder, emb_cache, c.batch_size)
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc="curate: decode+embed", unit="img", disable=None) as bar:
            for sha, row, x in bounded_map(_worker(embedder, c.max_pixels), todo, c.workers,
                                           max(2 * c.batch_size, 8)):
                if not row.get("missing"):
                    facts.add(row)
                else:
                    facts.rows[sha] = row  # not cached on disk: the file may come back
                if x is not None:
                    batch.add(sha, x)
                bar.update(1)
            batch.flush()
    finally:
        facts.close()
    wall = time.perf_counter() - t0
    stats["wall_s"] = round(wall, 3)
    stats["model_s"] = round(batch.model_s, 3)
    stats["img_per_s"] = round(len(todo) / wall, 2) if wall > 0 else None
