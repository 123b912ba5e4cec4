"""Web pool from webdataset shards read through the manifest, with random access by index.

Every shard's sha256 (and size) is checked against the manifest before anything is read; tar
members are indexed once (offset, size) so the per-epoch selection pass can address samples by
index and log their stable keys. Members with ``..``, absolute paths, links or devices are refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.core.errors import DataError
from pipeline.core.io import sha256_file
from pipeline.core.records import read_manifest, shard_path
from pipeline.core.slug import slugify

log = logging.getLogger("kd3.distill")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")


# ---------------------------------------------------------------- manifest + shards
def _shard_path(manifest_path: Path, url: str) -> Path:
    p = shard_path(manifest_path, url)
    if p is None:
        raise DataError(f"manifest {manifest_path}: shard {url} is remote; kd3 distill reads local shards")
    return p


def verify_shards(manifest_path, manifest: dict | None = None, part: tuple[int, int] = (0, 1)) -> list[Path]:
    """Check every shard exists and matches its manifest filesize and sha256. Returns the paths. ``part``
    ``(rank, world)``: this process hashes every world-th shard only (the ranks of one run share the
    reading; each still checks every shard's presence and size)."""
    mp = Path(manifest_path)
    man = manifest or read_manifest(mp)
    paths = []
    for i, s in enumerate(man["shardlist"]):
        sp = _shard_path(mp, s["url"])
        if not sp.is_file():
            raise DataError(f"shard {s['url']} listed in {mp} is missing ({sp})")
        if s.get("filesize") is not None and sp.stat().st_size != int(s["filesize"]):
            raise DataError(f"shard {s['url']} is corrupt: {sp.stat().st_size} bytes, manifest says {s['filesize']}")
        want = s.get("sha256")
        if not want:
            raise DataError(f"shard {s['url']}: manifest {mp} lists no sha256, cannot verify it")
        if i % part[1] != part[0]:
            paths.append(sp)
            continue
        got = sha256_file(sp)
        if got != want:
            raise DataError(f"shard {s['url']} is corrupt: sha256 {got[:12]}... does not match the manifest's {want[:12]}...")
        paths.append(sp)
    return paths


@dataclass(slots=True)
class Sample:
    """Where one image of the pool lies in its shard (held per image: slotted, ~100 B plus its key)."""

    key: str
    shard: int
    offset: int
    size: int
    ext: str
    label: int = -1           # query class index (noisy; never a training label)


def _safe_member(shard: Path, m: tarfile.TarInfo) -> bool:
    name = m.name
    if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
        raise DataError(f"shard {shard.name}: refused member {name!r} (path escapes the archive)")
    if m.issym() or m.islnk():
        raise DataError(f"shard {shard.name}: refused member {name!r} (link)")
    if m.isdir():
        return False
    if not m.isfile():
        raise DataError(f"shard {shard.name}: refused member {name!r} (not a regular file)")
    return True


def index_shard(path: Path, shard_idx: int, classes: list[str]) -> list[Sample]:
    """Group tar members by webdataset key; keep samples with an image."""
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not _safe_member(path, m):
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = (os.path.dirname(m.name) + "/" + stem).lstrip("/")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = (m.offset_data, m.size)
            fh = tf.fileobj
            out = []
            for key in order:
                g = groups[key]
                ext = next((e for e in IMAGE_EXTS if e in g), None)
                if ext is None:
                    continue
                s = Sample(key=key, shard=shard_idx, offset=g[ext][0], size=g[ext][1], ext=sys.intern(ext))
                if "cls" in g:
                    fh.seek(g["cls"][0])
                    try:
                        s.label = int(fh.read(g["cls"][1]).decode().strip())
                    except ValueError:
                        s.label = -1
                if "json" in g and s.label < 0:  # its class, from the sample's json (not kept: ~1.5 kB per image)
                    fh.seek(g["json"][0])
                    try:
                        meta = json.loads(fh.read(g["json"][1]).decode("utf-8"))
                    except (ValueError, UnicodeDecodeError):
                        meta = {}
                    if isinstance(meta, dict) and meta.get("class") in classes:
                        s.label = classes.index(meta["class"])
                out.append(s)
    except tarfile.TarError as e:
        raise DataError(f"shard {path.name} is not a readable tar file ({e})") from None
    return out


def holdout_of(key: str, fraction: float) -> bool:
    """Stable held-out membership from the key alone (same split on every run and rank)."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


# ---------------------------------------------------------------- transforms
def build_transforms(size: int, mean, std, augment: str = "rrc_flip", train: bool = True,
                     rrc_scale: tuple[float, float] = (0.08, 1.0)):
    """Training (or eval) transforms of distill and ``kd3 teacher train``: ``augment`` is one of AUGMENTS."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if not train or augment == "none":
        return T.Compose([T.Resize(size), T.CenterCrop(size), *norm])
    if augment == "flip":
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomHorizontalFlip(), *norm])
    if augment == "rrc_flip":
        return T.Compose([T.RandomResizedCrop(size, scale=rrc_scale), T.RandomHorizontalFlip(), *norm])
    if augment == "crop":  # pad + random crop, no flip: for digits, text, anything not mirror-symmetric
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8)), *norm])
    raise DataError(f"unknown augmentation {augment!r} (rrc_flip, crop, flip, none)")


def decode(data: bytes, where: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return im.convert("RGB")


# ---------------------------------------------------------------- datasets
class WebPool(Dataset):
    """Random-access view of the manifest's samples: ``ds[i] -> (image tensor, i)``.

    ``indices`` restricts the view to a subset (pool / held-out); ``ds.keys[i]`` is the stable key.
    """

    def __init__(self, shards: list[Path], samples: list[Sample], transform=None):
        self.shards = [str(s) for s in shards]
        self.samples = samples
        self.transform = transform
        self._fh: dict[int, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def _handle(self, shard: int):
        pid = os.getpid()
        if self._pid != pid:  # fresh handles in each loader worker
            self._fh, self._pid = {}, pid
        fh = self._fh.get(shard)
        if fh is None:
            fh = open(self.shards[shard], "rb")
            self._fh[shard] = fh
        return fh

    def read_bytes(self, i: int) -> bytes:
        s = self.samples[i]
        fh = self._handle(s.shard)
        fh.seek(s.offset)
        return fh.read(s.size)

    def image(self, i: int) -> Image.Image:
        s = self.samples[i]
        return decode(self.read_bytes(i), f"{Path(self.shards[s.shard]).name}:{s.key}")

    def __getitem__(self, i: int):
        im = self.image(i)
        x = self.transform(im) if self.transform is not None else im
        return x, i

    def subset(self, idx: list[int], transform=None) -> "WebPool":
        return WebPool([Path(s) for s in self.shards], [self.samples[i] for i in idx],
                       transform if transform is not None else self.transform)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"], d["_pid"] = {}, None
        return d


class LabelledFolder(Dataset):
    """ImageFolder (``root/<class>/*``) mapped onto the teacher's class indices."""

    def __init__(self, root, classes: list[str], transform, what: str = "eval_dir"):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{what} {root} does not exist")
        by_name = {c: i for i, c in enumerate(classes)}
        by_slug = {slugify(c): i for i, c in enumerate(classes)}
        self.items: list[tuple[Path, int]] = []
        unknown = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            idx = by_name.get(d.name, by_slug.get(slugify(d.name)))
            if idx is None:
                unknown.append(d.name)
                continue
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS:
                    self.items.append((f, idx))
        if unknown:
            raise DataError(f"{what} {root}: folders {unknown[:10]} are not teacher classes")
        if not self.items:
            raise DataError(f"{what} {root} holds no images in <class>/ folders")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        p, y = self.items[i]
        return self.transform(decode(p.read_bytes(), str(p))), y


@dataclass
class WebData:
    manifest: dict
    classes: list[str]
    pool: WebPool            # training pool (selection runs over it)
    holdout: Optional[WebPool]  # held-out web slice (validation / teacher agreement)


def read_keys_file(path) -> set[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"keys_file {p} does not exist")
    keys = {ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()}
    keys = {k for k in keys if k and not k.startswith("#")}
    if not keys:
        raise DataError(f"keys_file {p} lists no keys")
    return keys


def open_web_data(manifest_path, size: int, mean, std, augment: str = "rrc_flip",
                  val_fraction: float = 0.0, keys_file=None, manifest: dict | None = None,
                  part: tuple[int, int] = (0, 1)) -> WebData:
    """The pool and the held-out slice of a manifest (``manifest``: its dict, when the caller read it
    already); ``part``: which shards this rank hashes (:func:`verify_shards`)."""
    mp = Path(manifest_path)
    man = manifest if manifest is not None else read_manifest(mp)
    shards = verify_shards(mp, man, part)
    classes = list(man["classes"])
    samples: list[Sample] = []
    for i, sp in enumerate(shards):
        samples.extend(index_shard(sp, i, classes))
    seen: set[str] = set()
    for s in samples:
        if s.key in seen:
            raise DataError(f"manifest {mp}: sample key {s.key} occurs twice")
        seen.add(s.key)
    if not samples:
        raise DataError(f"manifest {mp}: the shards hold no images")
    train_t = build_transforms(size, mean, std, augment, train=True)
    eval_t = build_transforms(size, mean, std, augment, train=False)
    pool_s = [s for s in samples if not holdout_of(s.key, val_fraction)]
    if keys_file is not None:  # train on a vetted subset; the held-out slice stays the manifest's
        wanted = read_keys_file(keys_file)
        unknown = wanted - {s.key for s in samples}
        if len(unknown) == len(wanted):
            raise DataError(f"keys_file {keys_file}: none of its {len(wanted)} keys is in manifest {mp}")
        pool_s = [s for s in pool_s if s.key in wanted]
    hold_s = [s for s in samples if holdout_of(s.key, val_fraction)]
    if not pool_s:
        raise DataError(f"manifest {mp}: val_fraction {val_fraction} leaves no training images")
    pool = WebPool(shards, pool_s, train_t)
    hold = WebPool(shards, hold_s, eval_t) if hold_s else None
    return WebData(man, classes, pool, hold)


def collate_indexed(batch):
    xs, ids = zip(*batch)
    return torch.stack(xs), torch.tensor(ids, dtype=torch.long)
