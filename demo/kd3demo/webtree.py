"""The demo's web as a folder tree ``<class>/<file>`` (``demo-out/world/web-tree/``).

What the fake web serves under each query, as a local folder source reads it, so docs/GUIDE.md's
folder-source recipe can be tried on the demo's own web::

    kd3 crawl --set name=tree --classes zero,one,two,three,four,five,six,seven,eight,nine \\
        --crawl.sources folder --crawl.folder demo-out/world/web-tree

Every served file is there (junk, copies and broken files included: a crawl records why each is
dropped); the ground truth (``web/truth.jsonl``) is not. Files are hard links to ``web/files/`` where
the file system allows it, copies elsewhere.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_bytes, read_jsonl

TREE = "web-tree"


def export_web_tree(world_root: str | Path, dest: Optional[str | Path] = None) -> Path:
    """Write ``<dest>/<query>/<name>`` for every file of the world's web (idempotent); returns ``dest``."""
    root = Path(world_root)
    rows = read_jsonl(root / "web" / "truth.jsonl")
    if not rows:
        raise DataError(f"{root} holds no demo web (web/truth.jsonl is missing or empty)")
    out = Path(dest) if dest is not None else root / TREE
    for r in rows:
        src, dst = root / "web" / "files" / r["name"], out / r["query"] / r["name"]
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            atomic_write_bytes(dst, src.read_bytes())
    return out


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kd3demo.webtree", description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path("demo-out/world"), help="a generated demo world")
    ap.add_argument("--out", type=Path, help="destination (default: <world>/web-tree)")
    a = ap.parse_args(argv)
    try:
        print(export_web_tree(a.world, a.out))
    except DataError as e:
        print(f"kd3: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
