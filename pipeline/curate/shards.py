"""Step 8 of curation: webdataset tar shards, written atomically and resumably.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image

from .io import atomic_path, atomic_write_json, read_json, sha256_file
from .validate import inspect_image

log = logging.getLogger(__name__)

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
    from collections import deque

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

    def abort(self, exc: BaseException) -> None:
        try:
            self.tar.close()
        finally:
            try:
                self._cm.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                pass


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
    old_shards = old.get("shards", []) if old.get("params") == params else []
    done: list[dict] = []
    key_to_shard: dict[str, str] = {}
    pos = 0
    changed = False

    def _changed():
        nonlocal changed
        if not changed and on_change is not None:
            on_change()
        changed = True

    # 1) reuse the finished prefix whose planned content is unchanged
    for entry in old_shards:
        idx = len(done)
        url = f"shards/{name}-{idx:06d}.tar"
        n = entry["nsamples"]
        chunk = samples[pos:pos + n]
        p = shard_dir / Path(url).name
        if (entry.get("url") != url or len(chunk) != n or [s.key for s in chunk] != entry["keys"]
                or _chunk_hash(chunk) != entry["content"] or not p.is_file()
                or p.stat().st_size != entry["filesize"]
                or (entry.get("closed_by") == "end" and pos + n < len(samples))):
            break
        done.append(entry)
        for s in chunk:
            key_to_shard[s.key] = url
        pos += n
        if progress:
            progress(n)
    reused = len(done)

    def _save_state():
        atomic_write_json(state_path, {"params": params, "shards": done}, indent=None)

    if reused != len(old_shards):
        _changed()
        _save_state()

    # 2) write the rest, streaming samples into an open temporary tar
    cur: Optional[_OpenShard] = None
    cur_samples: list[Sample] = []
    cur_bytes = 1024

    def _open() -> _OpenShard:
        _changed()
        return _OpenShard(shard_dir / f"{name}-{len(done):06d}.tar")

    def _close(closed_by: str) -> None:
        nonlocal cur, cur_samples, cur_bytes
        url = f"shards/{name}-{len(done):06d}.tar"
        path = shard_dir / Path(url).name
        cur.close()
        entry = {"url": url, "nsamples": len(cur_samples), "filesize": path.stat().st_size,
                 "sha256": sha256_file(path), "keys": [x.key for x in cur_samples],
                 "content": _chunk_hash(cur_samples), "closed_by": closed_by}
        done.append(entry)
        for x in cur_samples:
            key_to_shard[x.key] = url
        _save_state()
        if progress:
            progress(len(cur_samples))
        cur, cur_samples, cur_bytes = None, [], 1024

    def _enc(s: Sample) -> Sample:
        return encode_sample(s, image_format, max_side, jpeg_quality, max_pixels)

    try:
        for s in bounded_map(_enc, samples[pos:], workers, window=max(4, 4 * max(1, workers))):
            size = _tar_size(s.files)
            if cur is not None and cur_bytes + size > max_bytes:
                _close("bytes")
            if cur is None:
                cur = _open()
            cur.add(s)
            s.files = {}  # memory stays bounded by the prefetch window
            cur_samples.append(s)
            cur_bytes += size
            if len(cur_samples) >= max_samples:
                _close("samples")
        if cur is not None:
            _close("end")
    except BaseException as e:
        if cur is not None:
            cur.abort(e)
        raise

    # 3) remove stale shards from an earlier, longer plan
    keep = {Path(e["url"]).name for e in done}
    for p in shard_dir.glob(f"{name}-*.tar"):
        if p.name not in keep:
            _changed()
            p.unlink()
    return [{k: e[k] for k in ("url", "nsamples", "filesize", "sha256")} for e in done], key_to_shard, reused


def _chunk_hash(chunk: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in chunk:
        h.update(s.content_hash().encode())
    return h.hexdigest()
