"""Pools a user already holds, as crawl sources: ``webdataset`` tar shards (img2dataset's output) and ``arrays``
(``.npy``/``.npz`` of N×H×W×3 uint8, or the downsampled-ImageNet batch layout: a pickled dict whose ``data``
is N×3072 uint8, channel-major).

A pool has no query per class. It is *built* once: every sample is read and its image stored content-addressed
in ``crawl/images/`` (an array row becomes a PNG there once; a file already there is not written again),
then each image is assigned a class by ``crawl.assign``: ``teacher`` (the teacher's argmax, the paper's rule)
or ``clip`` (zero-shot similarity to ``curate.prompt_templates``; trained weights only). A class's candidates
are its images, highest score first, so ``crawl.per_class`` keeps each class's top-k. The build is saved as
``crawl/pools/<source>-<key>.jsonl`` (key: the pool files, the assignment, the classes, the model), so a rerun
and the other classes' tasks read it instead of building again. A sample that cannot be read is one
``error`` record with its reason, class ``""`` (no class could be assigned).

Provenance: a record's ``url`` is ``<shard or file URI>#<sample key or row>``; the pool file keeps each
sample's own ``url`` field (a webdataset ``.json``) as ``origin``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import pickle
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal, Optional

import numpy as np
from pydantic import Field

from pipeline.core import plugins
from pipeline.core.config import EMBEDDERS, RunConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import atomic_write_bytes, iter_jsonl, sha256_bytes, sync_all, write_jsonl_atomic
from pipeline.core.plugin_settings import Settings
from pipeline.core.preflight import check_teacher
from pipeline.core.runs import RunDir

from .fetch import check_image_bytes
from .source import Candidate, Source, register_source

log = logging.getLogger("kd3.crawl")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class PoolSettings(Settings):
    assign: Literal["teacher", "clip"] = Field(
        "teacher", description="pool sources (webdataset, arrays): each image's class is the teacher's argmax "
                               "(the paper's rule) or CLIP's zero-shot choice (needs trained weights: "
                               "curate.clip_pretrained or curate.clip_weights); crawl.per_class keeps each "
                               "class's top images by that score")


class WebdatasetSettings(PoolSettings):
    webdataset: list[str] = Field(default_factory=list, json_schema_extra={"paths": True},
                                  description="tar shards for source 'webdataset': paths, file:// URLs or brace "
                                              "patterns (pool-{000000..000009}.tar)")


class ArraysSettings(PoolSettings):
    arrays: list[Path] = Field(default_factory=list, description="files for source 'arrays': .npy/.npz of "
                                                                 "N x H x W x 3 uint8, or downsampled-ImageNet "
                                                                 "batches (a pickled dict, data N x 3072 uint8); "
                                                                 "brace patterns (batch_{1..10}) too")


@dataclass
class Sample:
    """One sample of a pool file: encoded image bytes, or the reason there are none."""

    id: str
    data: Optional[bytes] = None
    origin: Optional[str] = None
    error: Optional[str] = None
    detail: str = ""


@dataclass(slots=True)
class PoolEntry:
    """One row of ``crawl/pools/<source>-<key>.jsonl``."""

    id: str
    sha256: Optional[str] = None
    ext: str = ""
    bytes: int = 0
    w: int = 0
    h: int = 0
    origin: Optional[str] = None
    error: Optional[str] = None
    detail: str = ""
    cls: Optional[str] = None
    score: float = 0.0
    path: Optional[str] = None  # relative to the run directory

    def to_row(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d

    @classmethod
    def from_row(cls, row: dict) -> "PoolEntry":
        row = dict(row)
        c = row.pop("class", None)
        row["cls"] = sys.intern(c) if isinstance(c, str) else c  # one string per class, not per entry
        return cls(**row)


class Pool(Source):
    """A local collection read whole: its files, read as samples, stored, assigned, then offered per class."""

    takes_whole = True
    option: ClassVar[str] = ""  # the crawl key that lists the files

    def __init__(self, ctx):
        super().__init__(ctx)
        self._by_class: Optional[dict[str, list[PoolEntry]]] = None

    # ---- the files
    @classmethod
    def files(cls, cfg: RunConfig) -> list[Path]:
        """``crawl.<option>``: paths, ``file://`` URLs or brace patterns (``batch_{1..10}``), in order, each once."""
        return expand_paths([str(p) for p in getattr(cfg.crawl, cls.option)], cls.option)

    @classmethod
    def read(cls, path: Path) -> Iterator[Sample]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def check_file(cls, path: Path) -> None:
        """One line naming the file, when it cannot be a file of this pool (cheap: headers only)."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        files = cls.files(cfg)
        if not files:
            raise ConfigError(f"source {cls.name!r} needs crawl.{cls.option} (a list of files)")
        for p in files:
            if not p.is_file():
                raise ConfigError(f"crawl.{cls.option} {p} does not exist")
            cls.check_file(p)
        check_assign(cfg)

    @classmethod
    def inputs(cls, cfg: RunConfig) -> dict[str, Optional[Path]]:
        return {f"{cls.option}[{i}]": p for i, p in enumerate(cls.files(cfg))}

    @classmethod
    def where(cls, cfg: RunConfig) -> str:
        files = cls.files(cfg)
        return f"crawl.{cls.option} {files[0] if len(files) == 1 else f'({len(files)} files)'}"

    # ---- candidates
    def candidates(self, cls: str, cfg: RunConfig) -> Iterator[Candidate]:
        if self._by_class is None:
            self._by_class = {}
            for e in self.build(cfg):
                if e.cls is not None and e.error is None:
                    self._by_class.setdefault(e.cls, []).append(e)
            for rows in self._by_class.values():
                rows.sort(key=lambda e: (-e.score, e.id))
        rd = RunDir(cfg.run_dir)
        for e in self._by_class.get(cls, []):
            yield Candidate(e.id, f"assign:{cfg.crawl.assign}", self.name, local=rd.root / e.path)

    def build(self, cfg: RunConfig) -> list[PoolEntry]:
        """The pool's entries: read from its file when built before, else built now (under a lock, so
        classes crawled in parallel build it once); a build records the unreadable samples."""
        rd = RunDir(cfg.run_dir)
        out = rd.crawl / "pools" / f"{self.name}-{pool_key(cfg, self)}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out.is_file():
                entries = [PoolEntry.from_row(row) for row in iter_jsonl(out)]
            else:
                entries = self.store(cfg, rd)
                sync_all()  # the images are durable before the pool file names them
                assign(cfg, rd, [e for e in entries if e.error is None])
                write_jsonl_atomic(out, (e.to_row() for e in entries))
                bad = sum(e.error is not None for e in entries)
                log.info("%s: %d samples, %d stored, %d unreadable", self.where(cfg), len(entries),
                         len(entries) - bad, bad)
        for e in entries:  # the crawl records each once (a rerun finds them recorded)
            if e.error is not None:
                self.ctx.reject(e.id, self.name, e.error, e.detail)
        return entries

    def store(self, cfg: RunConfig, rd: RunDir) -> list[PoolEntry]:
        """Every sample of every file, its image stored content-addressed (once)."""
        entries = []
        for path in self.files(cfg):
            for s in self.read(path):
                entries.append(store_sample(s, rd, cfg.crawl.max_bytes))
        return entries


def store_sample(s: Sample, rd: RunDir, max_bytes: int) -> PoolEntry:
    e = PoolEntry(s.id, origin=s.origin, error=s.error, detail=s.detail)
    if s.error is not None:
        return e
    data = s.data or b""
    if len(data) > max_bytes:
        e.error, e.detail = "too_large", f"{len(data)} bytes > max_bytes {max_bytes}"
        return e
    err, detail, ext, w, h = check_image_bytes(data)
    if err:
        e.error, e.detail = err, detail
        return e
    sha = sha256_bytes(data)
    path = rd.image_path(sha, ext)
    if not path.exists() or path.stat().st_size != len(data):  # (a file cut by a power loss is written again)
        atomic_write_bytes(path, data, durable=False)  # one sync for the whole pool (build)
    e.sha256, e.ext, e.bytes, e.w, e.h = sha, ext, len(data), w, h
    e.path = path.relative_to(rd.root).as_posix()
    return e


def pool_key(cfg: RunConfig, src: type[Pool] | Pool) -> str:
    """What a pool build depends on: its files (name, size, mtime), the assignment and its model, the classes."""
    files = []
    for p in src.files(cfg):
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    model = None
    if cfg.crawl.assign == "teacher" and cfg.teacher is not None and Path(cfg.teacher).is_file():
        st = Path(cfg.teacher).stat()
        model = [str(Path(cfg.teacher).resolve()), st.st_size, st.st_mtime_ns]
    elif cfg.crawl.assign == "clip":
        c = cfg.curate
        model = [c.clip_model, c.clip_pretrained, str(c.clip_weights), list(c.prompt_templates)]
    key = {"files": files, "assign": cfg.crawl.assign, "model": model, "classes": cfg.resolved_classes()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- assignment

def check_assign(cfg: RunConfig) -> None:
    """The assignment can work: a teacher for ``teacher``; configured CLIP weights for ``clip``."""
    if cfg.crawl.assign == "teacher":
        check_teacher(cfg, "crawl.assign teacher")
        return
    c = cfg.curate
    if c.clip_pretrained is None and c.clip_weights is None:
        raise ConfigError(f"crawl.assign clip: open_clip {c.clip_model} would have random weights, which assign "
                          f"no class; set curate.clip_pretrained or curate.clip_weights (or crawl.assign: teacher)")
    if c.clip_weights is not None and not Path(c.clip_weights).is_file():
        raise ConfigError(f"curate.clip_weights {c.clip_weights} does not exist")


def assign(cfg: RunConfig, rd: RunDir, entries: list[PoolEntry]) -> None:
    """Set each entry's class and score by ``crawl.assign`` (in batches of ``curate.batch_size``)."""
    if not entries:
        return
    classes = cfg.resolved_classes()
    emb = plugins.implementation(EMBEDDERS, cfg.crawl.assign, "crawl.assign").from_config(cfg.curate, classes,
                                                                                         cfg.teacher)
    if cfg.crawl.assign == "clip":
        if not emb.trained:
            raise ConfigError(f"crawl.assign clip: open_clip {cfg.curate.clip_model} has random/untrained weights, "
                              f"which assign no class; set curate.clip_pretrained or curate.clip_weights")
        text = class_text(emb, classes, cfg.curate.prompt_templates)
    from PIL import Image

    bs = cfg.curate.batch_size
    for i in range(0, len(entries), bs):
        chunk = entries[i:i + bs]
        imgs = []
        for e in chunk:
            with Image.open(rd.root / e.path) as im:
                imgs.append(emb.prepare(im.convert("RGB")))
        feats, probs = emb.embed(emb.collate(imgs))
        if cfg.crawl.assign == "clip":
            scores = feats @ text.T
        else:
            scores = probs[:, [-1 if j is None else j for j in emb.class_map]]
            scores[:, [k for k, j in enumerate(emb.class_map) if j is None]] = -np.inf
        best = scores.argmax(1)
        for e, k, row in zip(chunk, best, scores):
            e.cls, e.score = classes[int(k)], round(float(row[k]), 6)


def class_text(emb, classes: list[str], templates: list[str]) -> np.ndarray:
    """One L2-normalised text embedding per class: the mean over the prompt templates."""
    t = emb.text_embeddings([tpl.replace("{c}", c) for c in classes for tpl in templates])
    t = t.reshape(len(classes), len(templates), -1).mean(1)
    return t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)


# ---------------------------------------------------------------- webdataset shards

def expand_paths(patterns: list[str], option: str) -> list[Path]:
    from braceexpand import braceexpand

    out: list[Path] = []
    for pat in patterns:
        for s in braceexpand(pat):
            if s.startswith("file://"):
                s = s[len("file://"):]
            elif "://" in s:
                raise ConfigError(f"crawl.{option} {s}: only local files (paths or file:// URLs) are read")
            p = Path(s).expanduser()
            if p not in out:
                out.append(p)
    return out


@register_source("webdataset")
class Webdataset(Pool):
    """Tar shards of ``<key>.<image ext>`` (+ ``<key>.json`` with a ``url``, ``<key>.txt``), as img2dataset writes."""

    Settings = WebdatasetSettings
    option = "webdataset"

    @classmethod
    def check_file(cls, path: Path) -> None:
        if not tarfile.is_tarfile(path):
            raise DataError(f"crawl.webdataset shard {path} is not a tar file")

    @classmethod
    def read(cls, path: Path) -> Iterator[Sample]:
        uri = path.resolve().as_uri()
        group: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if base.startswith(".") or "." not in base:
                        continue
                    k = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    if k != key and key is not None:
                        yield _wds_sample(f"{uri}#{key}", group)
                        group = {}
                    key = k
                    group[base.split(".", 1)[1].lower()] = tf.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            yield Sample(f"{uri}#{key or ''}", error="bad_shard", detail=f"shard unreadable after key {key}: {e}"[:200])
            return
        if key is not None:
            yield _wds_sample(f"{uri}#{key}", group)


def _wds_sample(sid: str, files: dict[str, bytes]) -> Sample:
    origin = None
    if "json" in files:
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
            origin = json.loads(files["json"].decode("utf-8")).get("url")
    img = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if img is None:
        return Sample(sid, origin=origin, error="no_image", detail=f"no image file in the sample ({sorted(files)})")
    return Sample(sid, img, origin=origin)


# ---------------------------------------------------------------- arrays

class UnsafePickle(DataError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Dicts, lists, numbers, strings and numpy arrays only: any other global is refused before it is called."""

    SAFE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
            ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.SAFE:
            raise UnsafePickle(f"{module}.{name}")
        return super().find_class(module, name)


def restricted_load(path: Path):
    with open(path, "rb") as fh:
        try:
            return _RestrictedUnpickler(fh, encoding="latin1").load()
        except UnsafePickle as e:
            raise DataError(f"crawl.arrays {path}: refused: the pickle would call {e} (only dicts, lists, numbers, "
                            f"strings and numpy arrays are read)") from None
        except Exception as e:  # noqa: BLE001 - any other malformed pickle
            raise DataError(f"crawl.arrays {path}: not a .npy/.npz or a pickled batch ({type(e).__name__})") from None


def load_array(path: Path) -> np.ndarray:
    """N x H x W x 3 uint8 from a .npy (memory-mapped), a .npz (its ``data``/``images``/``x`` array, or its
    only one) or a pickled downsampled-ImageNet batch (``data`` N x 3*S*S, channel-major)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z[_npz_member(path, z.files)]
        else:
            arr = _batch_array(path, restricted_load(path))
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"crawl.arrays {path}: unreadable ({str(e).splitlines()[0][:120]})") from None
    _check_images(path, arr.shape, arr.dtype)
    return arr


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) of the .npy stream ``fh``, left at the start of its data."""
    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(fh),
                                                             np.lib.format.read_array_header_2_0)
    return read(fh)


def npy_rows(path: Path, block: int = 1024) -> Iterator[np.ndarray]:
    """The images of a .npy, read ``block`` rows at a time: a memory map's pages stay in the process's
    resident memory once read (the whole file by the end: 614 MB for 200k 32-px images)."""
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _npy_header(fh)
            _check_images(path, shape, dtype)
            row, start = int(np.prod(shape[1:])), fh.tell()
            if fortran:  # rows are not contiguous: through the memory map
                yield from iter(load_array(path))
                return
            if path.stat().st_size < start + shape[0] * row:
                raise ValueError(f"the file is shorter than its {shape[0]} rows")
            for i in range(0, shape[0], block):
                k = min(block, shape[0] - i)
                data = fh.read(k * row)
                if len(data) < k * row:
                    raise ValueError(f"the file ends inside row {i + len(data) // row}")
                yield from np.frombuffer(data, np.uint8).reshape((k, *shape[1:]))
    except (ValueError, OSError) as e:
        raise DataError(f"crawl.arrays {path}: unreadable ({str(e).splitlines()[0][:120]})") from None


def array_header(path: Path) -> None:
    """The shape and dtype check of :func:`load_array` from the headers only (.npy, .npz): before any work."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            _check_images(path, arr.shape, arr.dtype)
        elif path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                with zf.open(_npz_member(path, names) + ".npy") as fh:
                    shape, _, dtype = _npy_header(fh)
            _check_images(path, shape, dtype)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"crawl.arrays {path}: unreadable ({str(e).splitlines()[0][:120]})") from None


def _npz_member(path: Path, names: list[str]) -> str:
    name = next((n for n in ("data", "images", "x") if n in names), names[0] if len(names) == 1 else None)
    if name is None:
        raise DataError(f"crawl.arrays {path}: .npz has arrays {names}; name the images data, images or x")
    return name


def _check_images(path: Path, shape: tuple, dtype) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"crawl.arrays {path}: expected N x H x W x 3 uint8 images, got shape "
                        f"{tuple(shape)} dtype {np.dtype(dtype)}")


def _batch_array(path: Path, obj) -> np.ndarray:
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, np.ndarray):
        raise DataError(f"crawl.arrays {path}: a pickled batch must be a dict with a numpy array 'data'")
    if data.ndim != 2 or data.dtype != np.uint8:
        raise DataError(f"crawl.arrays {path}: batch 'data' must be N x 3*S*S uint8, got shape {data.shape} "
                        f"dtype {data.dtype}")
    side = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * side * side != data.shape[1]:
        raise DataError(f"crawl.arrays {path}: batch rows of {data.shape[1]} values are not 3 square channels")
    return data.reshape(len(data), 3, side, side).transpose(0, 2, 3, 1)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, "PNG")
    return buf.getvalue()


@register_source("arrays")
class Arrays(Pool):
    """Image arrays: each row becomes a PNG, stored once."""

    Settings = ArraysSettings
    option = "arrays"

    @classmethod
    def check_file(cls, path: Path) -> None:
        array_header(path)  # .npy/.npz: the headers, not the pixels (a pickled batch is checked when read)

    @classmethod
    def read(cls, path: Path) -> Iterator[Sample]:
        uri = path.resolve().as_uri()
        rows = npy_rows(path) if path.suffix.lower() == ".npy" else iter(load_array(path))
        for i, pixels in enumerate(rows):
            yield Sample(f"{uri}#{i}", png_bytes(pixels))
