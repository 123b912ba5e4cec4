"""Step 9 of curation: ``manifest.json`` — a wids shard index plus everything needed to trust it.

Readable by ``wids.ShardListDataset("runs/x/manifest.json")`` (shard urls are relative to the
manifest) and, through its ``shardlist`` urls, by ``webdataset.WebDataset``. Written last and
atomically: a crashed curate run leaves no manifest, never one listing an incomplete shard.
"""
from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .io import atomic_write_json, read_json

PACKAGES = ("kd3", "torch", "open_clip_torch", "faiss-cpu", "pillow", "imagehash", "webdataset", "wids", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(*, name: str, shardlist: list[dict], classes: list[str], class_counts: dict[str, int],
                   stats: dict, embedding: dict, thresholds: dict, config_hash: str,
                   extra: dict | None = None) -> dict[str, Any]:
    m = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": shardlist,
        "classes": list(classes),
        "class_counts": class_counts,
        "nsamples": sum(int(s["nsamples"]) for s in shardlist),
        "stats": stats,
        "embedding": embedding,
        "thresholds": thresholds,
        "config_hash": config_hash,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        m.update(extra)
    return m


def write_manifest(path: Path, manifest: dict) -> Path:
    return atomic_write_json(path, manifest)


def read_manifest(path: Path) -> dict:
    return read_json(path)
