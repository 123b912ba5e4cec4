"""Webdataset tar shards, written atomically and resumably.

Each sample is ``<key>.jpg`` (re-encoded, longer side <= max_side) or the original bytes with
their extension, ``<key>.json`` and ``<key>.cls``. A shard closes at ``shard_max_samples`` or
before it would pass ``shard_max_bytes``. Each shard goes to a temporary name and is renamed when
complete; ``curate/shards_state.json`` records finished shards (keys, content hash, size, sha256)
so a rerun reuses every shard whose planned content is unchanged and rewrites only the rest.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from PIL import Image

from pipeline.core.io import atomic_path, atomic_write_json, read_json, sha256_file

from .validate import inspect_image

log = logging.getLogger("kd3.curate")

TAR_MTIME = 1_700_000_000  # fixed: identical content gives identical shards
BLOCK = 512


@dataclass
class Sample:
    key: str
    meta: dict            # the <key>.json content
    label: int
    src: Path             # raw image file
    ext: str              # original extension (for image_format=original)
    files: dict[str, bytes] = field(default_factory=dict)

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps([self.key, self.meta, self.label], sort_keys=True).encode()).hexdigest()


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """Ordered ``map`` over a thread pool with at most ``window`` items in flight (bounded memory)."""
    if workers <= 0:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending: deque = deque()
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def encode_sample(s: Sample, image_format: str, max_side: int, jpeg_quality: int, max_pixels: int) -> Sample:
    raw = s.src.read_bytes()
    if image_format == "original":
        img_name, img_bytes = s.ext.lower().lstrip(".") or "bin", raw
    else:
        _, rgb = inspect_image(raw, max_pixels)
        if rgb is None:
            raise ValueError(f"{s.src}: no longer decodes")
        if max(rgb.size) > max_side:
            scale = max_side / max(rgb.size)
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                             Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=jpeg_quality)
        img_name, img_bytes = "jpg", buf.getvalue()
    s.files = {img_name: img_bytes,
               "json": json.dumps(s.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
               "cls": str(s.label).encode("ascii")}
    return s


def _tar_size(files: dict[str, bytes]) -> int:
    return sum(BLOCK + (len(b) + BLOCK - 1) // BLOCK * BLOCK for b in files.values())


class _OpenShard:
    """A tar being written under a temporary name; ``close`` renames it into place."""

    def __init__(self, path: Path):
        self._cm = atomic_path(path)
        self.tmp = self._cm.__enter__()
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.n = 0
        self.closed = False

    def add(self, s: Sample) -> None:
        for ext, data in s.files.items():
            ti = tarfile.TarInfo(f"{s.key}.{ext}")
            ti.size = len(data)
            ti.mtime = TAR_MTIME
            ti.mode = 0o444
            ti.uname = ti.gname = "kd3"
            self.tar.addfile(ti, io.BytesIO(data))
        self.n += 1

    def close(self) -> None:
        self.tar.close()
        self._cm.__exit__(None, None, None)
        self.closed = True

    def abort(self, exc: BaseException) -> None:
        try:
            self.tar.close()
        finally:
            try:
                self._cm.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                pass


class _Plan:
    """One ``write_shards`` call: the shards done so far (reused or new) and the state file behind them."""

    def __init__(self, shard_dir: Path, name: str, state_path: Path, params: dict,
                 on_change: Optional[Callable[[], None]], progress: Optional[Callable[[int], None]]):
        self.dir, self.name, self.state_path, self.params = shard_dir, name, state_path, params
        self.on_change, self.progress = on_change, progress
        self.done: list[dict] = []
        self.key_to_shard: dict[str, str] = {}
        self.changed = False

    def url(self) -> str:
        return f"shards/{self.name}-{len(self.done):06d}.tar"

    def mark_changed(self) -> None:
        if not self.changed and self.on_change is not None:
            self.on_change()
        self.changed = True

    def save_state(self) -> None:
        atomic_write_json(self.state_path, {"params": self.params, "shards": self.done}, indent=None)

    def add(self, entry: dict, chunk: list[Sample]) -> None:
        self.done.append(entry)
        for s in chunk:
            self.key_to_shard[s.key] = entry["url"]
        if self.progress:
            self.progress(len(chunk))

    def reuse_prefix(self, samples: list[Sample], old_shards: list[dict]) -> int:
        """Keep the finished shards whose planned content is unchanged; returns how many samples they hold."""
        pos = 0
        for entry in old_shards:
            url, n = self.url(), entry["nsamples"]
            chunk = samples[pos:pos + n]
            p = self.dir / Path(url).name
            if (entry.get("url") != url or len(chunk) != n or [s.key for s in chunk] != entry["keys"]
                    or _chunk_hash(chunk) != entry["content"] or not p.is_file()
                    or p.stat().st_size != entry["filesize"]
                    or (entry.get("closed_by") == "end" and pos + n < len(samples))):
                break
            self.add(entry, chunk)
            pos += n
        if len(self.done) != len(old_shards):
            self.mark_changed()
            self.save_state()
        return pos

    def write(self, encoded: Iterable[Sample], max_samples: int, max_bytes: int) -> None:
        """Stream the encoded samples into temporary tars, each renamed into place when it closes."""
        cur: Optional[_OpenShard] = None
        cur_samples: list[Sample] = []
        cur_bytes = 1024

        def close(closed_by: str) -> None:
            url = self.url()
            path = self.dir / Path(url).name
            cur.close()
            self.add({"url": url, "nsamples": len(cur_samples), "filesize": path.stat().st_size,
                      "sha256": sha256_file(path), "keys": [x.key for x in cur_samples],
                      "content": _chunk_hash(cur_samples), "closed_by": closed_by}, cur_samples)
            self.save_state()

        try:
            for s in encoded:
                size = _tar_size(s.files)
                if cur is not None and cur_bytes + size > max_bytes:
                    close("bytes")
                    cur, cur_samples, cur_bytes = None, [], 1024
                if cur is None:
                    self.mark_changed()
                    cur = _OpenShard(self.dir / Path(self.url()).name)
                cur.add(s)
                s.files = {}  # memory stays bounded by the prefetch window
                cur_samples.append(s)
                cur_bytes += size
                if len(cur_samples) >= max_samples:
                    close("samples")
                    cur, cur_samples, cur_bytes = None, [], 1024
            if cur is not None:
                close("end")
        except BaseException as e:
            if cur is not None and not cur.closed:
                cur.abort(e)
            raise

    def remove_stale(self) -> None:
        """Delete shards of an earlier, longer plan."""
        keep = {Path(e["url"]).name for e in self.done}
        for p in self.dir.glob(f"{self.name}-*.tar"):
            if p.name not in keep:
                self.mark_changed()
                p.unlink()


def write_shards(samples: list[Sample], shard_dir: Path, name: str, state_path: Path, *,
                 image_format: str, max_side: int, jpeg_quality: int, max_pixels: int,
                 max_samples: int, max_bytes: int, workers: int = 2,
                 on_change: Optional[Callable[[], None]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> tuple[list[dict], dict[str, str], int]:
    """Write ``samples`` (in order) into shards. Returns (shard entries, key -> shard url, reused count)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    for tmp in shard_dir.glob(f".{name}-*.tmp"):  # leftovers of a killed run
        tmp.unlink(missing_ok=True)
    params = {"image_format": image_format, "max_side": max_side, "jpeg_quality": jpeg_quality,
              "max_samples": max_samples, "max_bytes": max_bytes}
    old = read_json(state_path) if state_path.exists() else {}
    plan = _Plan(shard_dir, name, state_path, params, on_change, progress)
    pos = plan.reuse_prefix(samples, old.get("shards", []) if old.get("params") == params else [])
    reused = len(plan.done)

    def enc(s: Sample) -> Sample:
        return encode_sample(s, image_format, max_side, jpeg_quality, max_pixels)

    plan.write(bounded_map(enc, samples[pos:], workers, window=max(4, 4 * max(1, workers))), max_samples, max_bytes)
    plan.remove_stale()
    return ([{k: e[k] for k in ("url", "nsamples", "filesize", "sha256")} for e in plan.done], plan.key_to_shard,
            reused)


def _chunk_hash(chunk: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in chunk:
        h.update(s.content_hash().encode())
    return h.hexdigest()
