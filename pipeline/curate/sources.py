"""Where curate's images come from: the crawl's ``status: ok`` records, or (no crawl output) the
``crawl.folder`` tree read by the same reader the crawl uses (:mod:`pipeline.core.folder`)."""
from __future__ import annotations

import logging
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.core.config import RunConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.folder import class_files
from pipeline.core.io import sha256_file
from pipeline.core.records import read_records
from pipeline.core.runs import RunDir

log = logging.getLogger("kd3.curate")


@dataclass(slots=True)
class Candidate:
    cls: str
    label: int
    sha: str
    path: str      # as recorded (relative to the run dir) or an absolute path for folder sources
    url: str
    order: int
    root: Optional[Path] = None  # the run directory ``path`` is relative to (one object shared by all)

    @property
    def file(self) -> Path:
        """Where to read it (made when asked: a Path per candidate costs ~0.5 kB at 10^6 images)."""
        return Path(self.path) if self.root is None else self.root / self.path


@dataclass
class Sources:
    cands: list[Candidate]
    records: int       # rows (or files) looked at
    ok: int            # of them usable
    collapsed: int     # the same file twice under one class: counted once, as an exact duplicate
    where: str


def from_records(rd: RunDir, classes: list[str]) -> Sources:
    rows = read_records(rd.records)
    # in crawl-time order, not line order: records appended by concurrent workers, or a file that was
    # rewritten or merged, give the same candidates; ties (same time) by content, then URL
    ok = sorted((r for r in rows if r.status == "ok" and r.sha256 and r.path), key=lambda r: (r.time, r.sha256, r.url))
    cidx = {c: i for i, c in enumerate(classes)}
    seen: set[tuple[str, str]] = set()
    out: list[Candidate] = []
    unknown: Counter = Counter()
    for r in ok:
        if r.cls not in cidx:
            unknown[r.cls] += 1
        elif (r.cls, r.sha256) not in seen:
            seen.add((r.cls, r.sha256))
            out.append(Candidate(r.cls, cidx[r.cls], sys.intern(r.sha256), r.path, r.url or "", len(out), rd.root))
    for c, n in unknown.items():
        log.warning("curate: %d records of class %r, which is not in the class list, are ignored", n, c)
    collapsed = len(ok) - len(out) - sum(unknown.values())
    return Sources(out, len(rows), len(ok), collapsed, str(rd.records))


def from_folder(folder: Path, classes: list[str]) -> Sources:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"crawl.folder {folder} is not a folder")
    out: list[Candidate] = []
    seen: set[tuple[str, str]] = set()
    n_files = 0
    for label, c in enumerate(classes):
        d, files = class_files(folder, c)
        if d is None:
            log.warning("curate: class %r has no folder under %s", c, folder)
        for p in files:
            n_files += 1
            sha = sha256_file(p)
            if (c, sha) not in seen:
                seen.add((c, sha))
                ap = p.resolve()
                out.append(Candidate(c, label, sha, str(ap), ap.as_uri(), len(out)))
    return Sources(out, n_files, n_files, n_files - len(out), f"crawl.folder {folder}")


def classes_of(cfg: RunConfig, rd: RunDir) -> list[str]:
    """The config's classes; without any, those the crawl records name, in order."""
    try:
        return cfg.resolved_classes()
    except ConfigError:
        if rd.records.exists():
            names = list(OrderedDict.fromkeys(r.cls for r in read_records(rd.records) if r.cls))
            if names:
                return names
        raise


def reads(cfg: RunConfig) -> dict[str, Optional[Path]]:
    """Every file and folder curate reads besides its config (the flows' cache key fingerprints each): the
    crawl records (the images they name are content-addressed), or the ``crawl.folder`` tree without them;
    the teacher and CLIP weights it may embed with; the evaluation images it decontaminates against."""
    rd, c = RunDir(cfg.run_dir), cfg.curate
    return {"records": rd.records, "folder": None if rd.records.exists() else cfg.crawl.folder,
            "teacher": cfg.teacher, "clip_weights": c.clip_weights, "decontaminate": c.decontaminate}


def load(cfg: RunConfig, rd: RunDir, classes: list[str]) -> Sources:
    if rd.records.exists():
        src = from_records(rd, classes)
    elif cfg.crawl.folder is not None:
        src = from_folder(cfg.crawl.folder, classes)
    else:
        raise DataError(f"{rd.records} is missing: run `kd3 crawl` on {rd.root} first (or set crawl.folder)")
    if not src.cands:
        raise DataError(f"{src.where}: no usable images (status ok) for classes {classes}: nothing to curate")
    return src
