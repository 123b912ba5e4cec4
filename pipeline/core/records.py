"""Every file format of a run directory, each owned here once: a dataclass with ``to_row``/``from_row``
and one reader/writer pair per file. The stages write through it; inspect, the report, the flows and
the demo read through it.

| file | type | writer | reader |
|---|---|---|---|
| ``crawl/records.jsonl`` (append-only) | :class:`CrawlRecord` | :class:`RecordLog` | :func:`read_records` |
| ``crawl/summary.json`` | :class:`CrawlSummary` of :class:`ClassSummary` | :func:`update_crawl_summary` | :func:`read_crawl_summary` |
| ``curate/decisions.jsonl`` | :class:`Decision`, reasons :class:`DropReason` | :func:`write_decisions` | :func:`read_decisions` |
| ``curate/embeddings.npy`` + ``ids.json`` | float32 [N, D] + ids | :func:`write_embeddings` | :func:`read_embeddings` |
| ``curate/index.faiss`` + ``index_ids.json`` | FAISS index + ids | :func:`write_index` | :func:`read_index` |
| ``manifest.json`` | dict (wids) | :func:`write_manifest` | :func:`read_manifest` |
| ``distill/*/selection.jsonl`` | :class:`SelectionRow` (keys, ``"all"`` or a bitmask) | :func:`append_selection` | :func:`read_selection` |
| ``distill/*/pool_keys.txt`` | key per line | :func:`write_pool_keys` | :func:`read_pool_keys` |
| ``distill/*/metrics.json`` | dict | :func:`write_metrics` | :func:`read_metrics` |
| ``loop/round-NNN.json`` | :class:`LoopRound` (+ :class:`YieldTable` of :class:`ClassYield`, :class:`QueryYield`) | :func:`write_loop_round` | :func:`read_loop_rounds` |
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

from .errors import DataError
from .io import JsonlAppender, atomic_path, atomic_write_json, atomic_write_text, iter_jsonl, read_json, \
    write_jsonl_atomic


def _json_or_error(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None


def _jsonl_or_error(path: Path) -> Iterator[dict]:
    """The rows of a JSONL file one at a time (a pool's logs run to 10^6 lines); a bad line is a DataError."""
    try:
        yield from iter_jsonl(path)
    except ValueError as e:
        raise DataError(str(e)) from None


def _i(s: Optional[str]) -> Optional[str]:
    """One string object for the values every row repeats (class, engine, status, reason): a row of a
    million-row log then holds a reference, not a copy."""
    return sys.intern(s) if isinstance(s, str) else s


# ====================================================================== drop reasons

class DropReason(str, Enum):
    """Why curate dropped an image. Order = report order; ``group`` = the curate step family."""

    INVALID = "invalid"
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    BOMB = "bomb"
    EXACT_DUP = "exact_dup"
    PHASH_DUP = "phash_dup"
    NEAR_DUP = "near_dup"
    CROSS_CLASS_DUP = "cross_class_dup"
    CONTAMINATED = "contaminated"
    OFF_CLASS = "off_class"

    @property
    def label(self) -> str:
        return _REASON_INFO[self][0]

    @property
    def group(self) -> str:
        """``validate`` | ``duplicate`` | ``contaminated`` | ``off_class``."""
        return _REASON_INFO[self][1]

    @property
    def color(self) -> str:
        return _REASON_INFO[self][2]

    @classmethod
    def of(cls, value: Any) -> Optional["DropReason"]:
        """The reason named by a row's ``reason`` value (None for kept or unknown values)."""
        try:
            return cls(value) if value is not None else None
        except ValueError:
            return None


_REASON_INFO = {
    DropReason.INVALID: ("invalid", "validate", "#6b7280"),
    DropReason.TOO_SMALL: ("too small", "validate", "#6b7280"),
    DropReason.BAD_ASPECT: ("bad aspect", "validate", "#6b7280"),
    DropReason.BOMB: ("decompression bomb", "validate", "#374151"),
    DropReason.EXACT_DUP: ("exact duplicate", "duplicate", "#ea580c"),
    DropReason.PHASH_DUP: ("pHash duplicate", "duplicate", "#f59e0b"),
    DropReason.NEAR_DUP: ("near duplicate", "duplicate", "#d97706"),
    DropReason.CROSS_CLASS_DUP: ("cross-class duplicate", "duplicate", "#b45309"),
    DropReason.CONTAMINATED: ("contaminated", "contaminated", "#7c3aed"),
    DropReason.OFF_CLASS: ("off-class", "off_class", "#db2777"),
}
DROP_REASONS = tuple(r.value for r in DropReason)
VALIDATE_REASONS = tuple(r.value for r in DropReason if r.group == "validate")
DUP_REASONS = tuple(r.value for r in DropReason if r.group == "duplicate")


# ====================================================================== crawl records

@dataclass(slots=True)
class CrawlRecord:
    """One row of ``crawl/records.jsonl``: one URL (or local file) tried for one class."""

    cls: str                      # original class name (not the slug); the row's key is "class"
    query: str = ""               # the query that found it ("" for url lists / folders)
    engine: str = ""              # bing | baidu | google | flickr | urls | folder
    url: str = ""                 # image URL, or file:// path for folder sources
    status: str = "error"         # ok | duplicate | error (duplicate = content already stored for this class)
    error: Optional[str] = None   # reason when status == error: http_404, timeout, too_large, ...
    sha256: Optional[str] = None  # content hash when downloaded
    bytes: int = 0                # body size
    w: int = 0                    # decoded size (0 when unknown)
    h: int = 0
    path: Optional[str] = None    # file path relative to the run directory
    time: float = 0.0             # unix time of the attempt

    def to_row(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return {k: d[k] for k in RECORD_FIELDS}

    @classmethod
    def from_row(cls, row: dict) -> "CrawlRecord":
        return cls(cls=_i(row.get("class")), query=_i(row.get("query") or ""), engine=_i(row.get("engine") or ""),
                   url=row.get("url") or "", status=_i(row.get("status") or "error"), error=_i(row.get("error")),
                   sha256=row.get("sha256"), bytes=int(row.get("bytes") or 0), w=int(row.get("w") or 0),
                   h=int(row.get("h") or 0), path=row.get("path"), time=float(row.get("time") or 0.0))


RECORD_FIELDS = ("class", "query", "engine", "url", "status", "error", "sha256", "bytes", "w", "h", "path", "time")


def iter_records(path: Path) -> Iterator[CrawlRecord]:
    """The rows one at a time (a torn last line from a crash is skipped)."""
    return (CrawlRecord.from_row(r) for r in _jsonl_or_error(path))


def read_records(path: Path) -> list[CrawlRecord]:
    """All rows (a torn last line from a crash is skipped)."""
    return list(iter_records(path))


def downloads_per_class(path: Path) -> dict[str, int]:
    """Images downloaded (``status: ok``) per query class, from ``crawl/records.jsonl``."""
    out: dict[str, int] = {}
    for r in read_records(path):
        if r.status == "ok":
            out[r.cls] = out.get(r.cls, 0) + 1
    return out


class RecordLog:
    """The append-only writer of ``crawl/records.jsonl`` (thread-safe; every row reaches the OS at once, so a
    killed crawl loses none; fsynced at most once a second and at close: a pool of 200k local images is
    200k rows, and an fsync per row cost more than reading them)."""

    def __init__(self, path: Path):
        self._app = JsonlAppender(path, sync_s=1.0)

    def append(self, rec: CrawlRecord) -> None:
        self._app.write(rec.to_row())

    def close(self) -> None:
        self._app.close()


# ====================================================================== crawl summary

@dataclass
class ClassSummary:
    """One class in ``crawl/summary.json``: counts over every crawl of the run so far."""

    target: Optional[int]  # None: every image of a folder source
    found: int = 0
    downloaded: int = 0
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    done: bool = False
    skipped: bool = False
    this_run: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    slug: Optional[str] = None

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "ClassSummary":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})


@dataclass
class CrawlSummary:
    """``crawl/summary.json``. ``target_per_class`` is the number asked per class; ``classes`` the
    per-class counts (files written before it was named held the target under ``per_class``)."""

    classes: dict[str, ClassSummary] = field(default_factory=dict)
    ok: bool = False
    run_dir: str = ""
    sources: list[str] = field(default_factory=list)
    target_per_class: Optional[int] = None
    total: dict[str, int] = field(default_factory=dict)
    updated: str = ""
    deadline_hit: bool = False
    elapsed_s: Optional[float] = None

    def merge(self, per_class: dict[str, ClassSummary]) -> None:
        """Add or replace classes; ``ok``/``total`` are recomputed over every class."""
        self.classes.update(per_class)
        self.total = {"found": 0, "downloaded": 0, "duplicates": 0, "failed": 0}
        for s in self.classes.values():
            self.total["found"] += s.found
            self.total["downloaded"] += s.downloaded
            self.total["duplicates"] += s.duplicates
            self.total["failed"] += sum(s.failed.values())
        self.ok = all(s.downloaded > 0 for s in self.classes.values()) if self.classes else False

    def to_row(self) -> dict:
        d = {"ok": self.ok, "run_dir": self.run_dir, "sources": list(self.sources),
             "target_per_class": self.target_per_class,
             "classes": {n: s.to_row() for n, s in self.classes.items()}, "total": self.total,
             "updated": self.updated, "deadline_hit": self.deadline_hit}
        if self.elapsed_s is not None:
            d["elapsed_s"] = self.elapsed_s
        return d

    @classmethod
    def from_row(cls, row: dict) -> "CrawlSummary":
        target = row.get("target_per_class")
        if target is None and isinstance(row.get("per_class"), int):
            target = row["per_class"]  # the name older files used for the same number
        return cls(classes={n: ClassSummary.from_row(s) for n, s in (row.get("classes") or {}).items()},
                   ok=bool(row.get("ok")), run_dir=row.get("run_dir") or "", sources=list(row.get("sources") or []),
                   target_per_class=target, total=dict(row.get("total") or {}), updated=row.get("updated") or "",
                   deadline_hit=bool(row.get("deadline_hit")), elapsed_s=row.get("elapsed_s"))


def read_crawl_summary(path: Path) -> Optional[CrawlSummary]:
    """The summary, or None when no crawl has written one."""
    return CrawlSummary.from_row(_json_or_error(path)) if Path(path).is_file() else None


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "w")
    try:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()


def update_crawl_summary(path: Path, per_class: dict[str, ClassSummary], **fields_: Any) -> CrawlSummary:
    """Merge classes into ``crawl/summary.json`` under a file lock (classes are crawled in parallel)."""
    path = Path(path)
    with _locked(path.parent / ".summary.lock"):
        summary = read_crawl_summary(path) or CrawlSummary()
        summary.merge(per_class)
        for k, v in fields_.items():
            setattr(summary, k, v)
        summary.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(path, summary.to_row())
    return summary


# ====================================================================== curate decisions

@dataclass(slots=True)
class Decision:
    """One row of ``curate/decisions.jsonl``: one distinct (class, raw image) pair, kept or why not."""

    id: str                                   # sha256 of the file
    cls: str                                  # the row's key is "class"
    label: int
    path: str
    url: str
    kept: bool = True
    reason: Optional[DropReason] = None
    detail: str = ""
    dup_of: Optional[str] = None
    w: int = 0
    h: int = 0
    phash: Optional[str] = None
    clip_scores: Optional[list[float]] = None
    clip_top: Optional[str] = None
    teacher_conf: Optional[float] = None
    shard: Optional[str] = None
    key: Optional[str] = None

    def drop(self, reason: DropReason, detail: str = "", dup_of: Optional[str] = None) -> None:
        self.kept, self.reason, self.detail, self.dup_of = False, DropReason(reason), detail, dup_of

    def to_row(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["reason"] = self.reason.value if self.reason is not None else None
        out = {"id": d.pop("id"), "class": d.pop("cls")}
        out.update(d)
        return out

    @classmethod
    def from_row(cls, row: dict) -> "Decision":
        known = {f.name for f in fields(cls)} - {"cls", "reason"}
        d = {k: v for k, v in row.items() if k in known}
        return cls(cls=_i(row.get("class")), reason=DropReason.of(row.get("reason")), **d)


def write_decisions(path: Path, rows: Iterable[Decision]) -> Path:
    return write_jsonl_atomic(path, (r.to_row() for r in rows))


def iter_decisions(path: Path) -> Iterator[Decision]:
    return (Decision.from_row(r) for r in _jsonl_or_error(path))


def read_decisions(path: Path) -> list[Decision]:
    return list(iter_decisions(path))


# ====================================================================== embeddings and index

def write_embeddings(npy: Path, ids_path: Path, ids: list[str], emb) -> None:
    """``curate/embeddings.npy`` (float32 [N, D], L2-normalised) + ``curate/ids.json`` (row -> image id)."""
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, emb)
    atomic_write_json(ids_path, list(ids), indent=None)


def _ids(path: Path) -> list[str]:
    ids = _json_or_error(path)
    if isinstance(ids, dict):  # tolerate {"ids": [...]} written by hand
        ids = ids.get("ids") or ids.get("keys") or []
    return [str(i) for i in ids]


def read_embeddings(npy: Path, ids_path: Path):
    """(memory-mapped float32 matrix, ids)."""
    return np.load(npy, mmap_mode="r"), _ids(ids_path)


def write_index(index, ids: list[str], index_path: Path, ids_path: Path) -> None:
    """``curate/index.faiss`` + its id map ``curate/index_ids.json``."""
    import faiss  # heavy: only when an index is written

    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(ids_path, list(ids), indent=None)


def read_index(index_path: Path, ids_path: Path):
    """(FAISS index, ids); a broken pair is a one-line DataError."""
    import faiss  # heavy: only when an index is read

    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise DataError(f"{index_path} is not a readable FAISS index ({str(e).splitlines()[0]})") from None
    ids = _ids(ids_path)
    if len(ids) != index.ntotal:
        raise DataError(f"{ids_path} has {len(ids)} ids but {index_path} holds {index.ntotal} vectors")
    return index, ids


# ====================================================================== manifest

MANIFEST_PACKAGES = ("kd3", "torch", "open_clip_torch", "faiss-cpu", "pillow", "imagehash", "webdataset", "wids",
                     "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in MANIFEST_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(*, name: str, shardlist: list[dict], classes: list[str], class_counts: dict[str, int],
                   stats: dict, embedding: dict, thresholds: dict, config_hash: str,
                   extra: dict | None = None) -> dict[str, Any]:
    """``manifest.json``: a wids shard index (urls relative to the manifest) + what is needed to trust it."""
    m = {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shardlist,
        "classes": list(classes), "class_counts": class_counts,
        "nsamples": sum(int(s["nsamples"]) for s in shardlist), "stats": stats, "embedding": embedding,
        "thresholds": thresholds, "config_hash": config_hash, "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    m.update(extra or {})
    return m


def write_manifest(path: Path, manifest: dict) -> Path:
    return atomic_write_json(path, manifest)


def shard_path(manifest_path: Path, url: str) -> Optional[Path]:
    """Where a shardlist ``url`` lies (relative urls are relative to the manifest, ``file://`` allowed);
    None for a remote url (``s3://``, ``https://``, ...)."""
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        return None
    q = Path(url[7:] if url.startswith("file://") else url)
    return q if q.is_absolute() else Path(manifest_path).parent / q


def read_manifest(path) -> dict:
    """The manifest, checked: a missing file, bad JSON, no shardlist/classes are one-line DataErrors."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest {p} does not exist: run `kd3 curate` first")
    try:
        man = read_json(p)
    except ValueError as e:
        raise DataError(f"manifest {p} is not valid JSON ({e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("shardlist"), list):
        raise DataError(f"manifest {p} has no 'shardlist'")
    if not man.get("classes"):
        raise DataError(f"manifest {p} has no 'classes'")
    for i, s in enumerate(man["shardlist"]):
        if not isinstance(s, dict) or "url" not in s:
            raise DataError(f"manifest {p}: shardlist[{i}] has no 'url'")
    return man


# ====================================================================== distill: selection log

ALL = "all"


@dataclass
class SelectionRow:
    """One epoch of ``selection.jsonl``. ``selected`` is a key list, :data:`ALL` (the whole pool) or a hex
    bitmask over the order of ``pool_keys.txt``, whichever is shorter: a list costs ~20 bytes per selected
    image, the mask a quarter of a byte per pool image (250 kB per epoch for a million images)."""

    epoch: int
    alpha: Optional[float] = None
    thresholds: Optional[dict[str, float]] = None
    selected_per_class: dict[str, int] = field(default_factory=dict)
    selected: Union[list[str], str, None] = None
    mask_hex: Optional[str] = None
    mask_order: str = "pool_keys.txt"
    extra: dict = field(default_factory=dict)   # the method's own log (pred_counts, one_off, ...)

    @classmethod
    def of(cls, epoch: int, pool_keys: list[str], indices: Optional[list[int]], **kw) -> "SelectionRow":
        """The row for ``indices`` of the pool (None = all of it), in the shorter form (keys or mask)."""
        if indices is None:
            return cls(epoch, selected=ALL, **kw)
        if sum(len(pool_keys[i]) + 4 for i in indices) <= (len(pool_keys) + 3) // 4:
            return cls(epoch, selected=[pool_keys[i] for i in indices], **kw)
        return cls(epoch, mask_hex=mask_hex(len(pool_keys), indices), **kw)

    @property
    def selects(self) -> bool:
        """True when the row names a subset (False for "all")."""
        return isinstance(self.selected, list) or self.mask_hex is not None

    def keys(self, pool: Iterable[str], run_dir: Path) -> set[str]:
        """The selected keys; ``pool`` for :data:`ALL`, ``run_dir/pool_keys.txt`` for a mask."""
        if isinstance(self.selected, list):
            return {str(k) for k in self.selected}
        if self.selected == ALL:
            return set(pool or [])
        if self.mask_hex is None:
            return set()
        order = read_pool_keys(Path(run_dir) / self.mask_order, Path(run_dir) / "selection.jsonl")
        bits = bin(int(self.mask_hex, 16))[2:].zfill(len(order))
        if len(bits) != len(order):
            raise DataError(f"{Path(run_dir) / 'selection.jsonl'}: epoch {self.epoch} mask has {len(bits)} bits "
                            f"for {len(order)} pool keys")
        return {k for k, b in zip(order, bits) if b == "1"}

    def to_row(self) -> dict:
        row = {"epoch": self.epoch, "alpha": self.alpha, "thresholds": self.thresholds,
               "selected_per_class": self.selected_per_class}
        if self.mask_hex is not None:
            row.update(selected_mask_hex=self.mask_hex, mask_order=self.mask_order)
        else:
            row["selected_keys"] = self.selected
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "SelectionRow":
        own = {"epoch", "alpha", "thresholds", "selected_per_class", "selected_keys", "selected_mask_hex",
               "mask_order"}
        return cls(epoch=row.get("epoch", -1), alpha=row.get("alpha"), thresholds=row.get("thresholds"),
                   selected_per_class=row.get("selected_per_class") or {}, selected=row.get("selected_keys"),
                   mask_hex=row.get("selected_mask_hex"), mask_order=row.get("mask_order") or "pool_keys.txt",
                   extra={k: v for k, v in row.items() if k not in own})


def mask_hex(n: int, indices: Iterable[int]) -> str:
    """The bits ``indices`` of an ``n``-bit mask, first pool key = most significant bit, as lower-case hex
    without leading zeros (``format(int(bits, 2), "x")``, built in O(n) without a string of n digits)."""
    buf = bytearray((n + 7) // 8)
    pad = (-n) % 8
    for i in indices:
        j = i + pad
        buf[j >> 3] |= 0x80 >> (j & 7)
    return buf.hex().lstrip("0") or "0"


def read_selection(path: Path) -> list[SelectionRow]:
    return [SelectionRow.from_row(r) for r in _jsonl_or_error(path)]


def append_selection(path: Path, row: SelectionRow) -> None:
    with JsonlAppender(path) as app:
        app.write(row.to_row())


def truncate_selection(path: Path, before_epoch: int) -> None:
    """Keep the rows of epochs before ``before_epoch`` (a resumed run drops those after its checkpoint)."""
    if Path(path).exists():
        write_jsonl_atomic(path, [r.to_row() for r in read_selection(path) if r.epoch < before_epoch])


def write_pool_keys(path: Path, keys: Iterable[str]) -> None:
    atomic_write_text(path, "".join(k + "\n" for k in keys))


def read_pool_keys(path: Path, used_by: Optional[Path] = None) -> list[str]:
    if not Path(path).is_file():
        raise DataError(f"{used_by or path.parent} uses a key mask but {path} is missing")
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


# ====================================================================== distill: metrics

def write_metrics(path: Path, metrics: dict) -> Path:
    """``metrics.json``: method, student, teacher, config, per-epoch rows, ``final`` (docs/INTERFACES.md)."""
    return atomic_write_json(path, metrics)


def read_metrics(path: Path) -> dict:
    return _json_or_error(path)


# ====================================================================== the crawl-selection loop

@dataclass
class QueryYield:
    """One query of one class: images it downloaded (first found by it), kept by curate, and selected by
    the distill method (mean over the last epochs). ``rate`` = selected per download."""

    source: str
    query: str
    downloaded: int = 0
    kept: int = 0
    selected: float = 0.0

    @property
    def rate(self) -> float:
        return self.selected / self.downloaded if self.downloaded else 0.0

    def to_row(self) -> dict:
        return {**asdict(self), "rate": round(self.rate, 4)}

    @classmethod
    def from_row(cls, row: dict) -> "QueryYield":
        return cls(source=row.get("source") or "", query=row.get("query") or "", downloaded=int(row.get("downloaded") or 0),
                   kept=int(row.get("kept") or 0), selected=float(row.get("selected") or 0.0))


@dataclass
class ClassYield:
    """One query class after a distill run: downloaded, kept by curate, in the training pool, selected
    (mean over the last epochs), the student-teacher agreement on its held-out web slice, its queries."""

    downloaded: int = 0
    kept: int = 0
    pool: int = 0
    selected: float = 0.0
    agreement: Optional[float] = None
    starved: bool = False
    queries: list[QueryYield] = field(default_factory=list)

    @property
    def ratio(self) -> Optional[float]:
        """Selected per kept image."""
        return self.selected / self.kept if self.kept else None

    def to_row(self) -> dict:
        d = {k: getattr(self, k) for k in ("downloaded", "kept", "pool", "selected", "agreement", "starved")}
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        d["queries"] = [q.to_row() for q in self.queries]
        return d

    @classmethod
    def from_row(cls, row: dict) -> "ClassYield":
        return cls(downloaded=int(row.get("downloaded") or 0), kept=int(row.get("kept") or 0),
                   pool=int(row.get("pool") or 0), selected=float(row.get("selected") or 0.0),
                   agreement=row.get("agreement"), starved=bool(row.get("starved")),
                   queries=[QueryYield.from_row(q) for q in row.get("queries") or []])


@dataclass
class YieldTable:
    """Per query class yield of one distill run. ``selects`` is False for a method that trains on the whole
    pool (kd): then ``selected`` is the pool count and starvation is read from kept images."""

    method: str
    method_dir: str
    selects: bool
    epochs: list[int] = field(default_factory=list)
    min_selected: float = 0.0
    classes: dict[str, ClassYield] = field(default_factory=dict)

    @property
    def starved(self) -> list[str]:
        return [c for c, y in self.classes.items() if y.starved]

    def to_row(self) -> dict:
        return {"method": self.method, "method_dir": self.method_dir, "selects": self.selects, "epochs": self.epochs,
                "min_selected": self.min_selected, "starved": self.starved,
                "classes": {c: y.to_row() for c, y in self.classes.items()}}

    @classmethod
    def from_row(cls, row: dict) -> "YieldTable":
        return cls(method=row.get("method") or "", method_dir=row.get("method_dir") or "",
                   selects=bool(row.get("selects")), epochs=list(row.get("epochs") or []),
                   min_selected=float(row.get("min_selected") or 0.0),
                   classes={c: ClassYield.from_row(y) for c, y in (row.get("classes") or {}).items()})


LOOP_STATUSES = ("started", "crawled", "curated", "done")


@dataclass
class LoopRound:
    """``loop/round-NNN.json``: one round of the loop, rewritten (atomically) as it advances through
    ``status`` started -> crawled -> curated -> done. Round 0 is the first pipeline run (only ``after``).
    ``before`` is the yield of the previous round's distill run, ``plan`` the queries asked per starved class
    (``{"source", "query", "quota"}``), ``targets`` the downloads each class must reach, ``added`` what the
    round added per class (downloaded, kept), ``after`` the yield of this round's distill run, ``stop`` why
    the loop ends after this round (None: it goes on)."""

    round: int
    status: str = "started"
    before: Optional[YieldTable] = None
    plan: dict[str, list[dict]] = field(default_factory=dict)
    downloaded_before: dict[str, int] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)
    added: dict[str, dict[str, int]] = field(default_factory=dict)
    distill_dir: Optional[str] = None
    after: Optional[YieldTable] = None
    stop: Optional[str] = None
    updated: str = ""

    def to_row(self) -> dict:
        return {"round": self.round, "status": self.status,
                "before": None if self.before is None else self.before.to_row(), "plan": self.plan,
                "downloaded_before": self.downloaded_before, "targets": self.targets, "added": self.added,
                "distill_dir": self.distill_dir, "after": None if self.after is None else self.after.to_row(),
                "stop": self.stop, "updated": self.updated}

    @classmethod
    def from_row(cls, row: dict) -> "LoopRound":
        def table(v):
            return None if not v else YieldTable.from_row(v)

        return cls(round=int(row["round"]), status=row.get("status") or "started", before=table(row.get("before")),
                   plan=dict(row.get("plan") or {}), downloaded_before=dict(row.get("downloaded_before") or {}),
                   targets=dict(row.get("targets") or {}), added=dict(row.get("added") or {}),
                   distill_dir=row.get("distill_dir"), after=table(row.get("after")), stop=row.get("stop"),
                   updated=row.get("updated") or "")


def loop_round_path(loop_dir: Path, r: int) -> Path:
    return Path(loop_dir) / f"round-{r:03d}.json"


def write_loop_round(loop_dir: Path, rnd: LoopRound) -> Path:
    if rnd.status not in LOOP_STATUSES:
        raise ValueError(f"loop round status {rnd.status!r} is not one of {LOOP_STATUSES}")
    rnd.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return atomic_write_json(loop_round_path(loop_dir, rnd.round), rnd.to_row())


def read_loop_rounds(loop_dir: Path) -> list[LoopRound]:
    """Every round file, by round number ([] when the run has no loop)."""
    files = sorted(Path(loop_dir).glob("round-[0-9][0-9][0-9].json")) if Path(loop_dir).is_dir() else []
    rows = []
    for f in files:
        try:
            rows.append(LoopRound.from_row(_json_or_error(f)))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{f} is not a loop round file ({e})") from None
    return sorted(rows, key=lambda r: r.round)
