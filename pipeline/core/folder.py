"""The one reader of a local image tree ``<root>/<class>/*`` (``crawl.folder``), for crawl and curate alike.

A class's folder is the first sub-folder named as the class, its slug, or the class name in another
case. Its files are every regular file below it, sorted, except hidden ones and symlinks that point
outside the class folder (a tree must not reach the rest of the disk). Whether a file is an image is
decided later, by whoever reads its bytes, so a stray file gets a recorded reason instead of silence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from .errors import ConfigError
from .slug import slugify


def match_class(value: str, classes: list[str]) -> Optional[str]:
    """The class a folder name / list column names: exact, its slug, or case-insensitive."""
    v = (value or "").strip()
    for c in classes:
        if v == c or v == slugify(c) or v.lower() == c.lower():
            return c
    return None


def class_folder(root: Path, name: str) -> Optional[Path]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"crawl.folder {root} is not a folder")
    return next((d for d in sorted(root.iterdir()) if d.is_dir() and match_class(d.name, [name])), None)


def iter_class_files(folder: Path) -> Iterator[Path]:
    """The files of one class folder, sorted, lazily (stop at the first to learn whether there is one)."""
    inside = folder.resolve()
    for f in sorted(folder.rglob("*")):
        if not f.name.startswith(".") and f.is_file() and inside in f.resolve().parents:
            yield f


def class_files(root: Path, name: str) -> tuple[Optional[Path], list[Path]]:
    """(the class folder or None, its files) for class ``name`` under ``root``."""
    folder = class_folder(root, name)
    return (None, []) if folder is None else (folder, list(iter_class_files(folder)))
