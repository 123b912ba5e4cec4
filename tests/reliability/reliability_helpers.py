"""Reliability/security test helpers (importable: conftest puts this folder on sys.path): run the real `kd3` executable, load other areas' fixture modules
by path (so their fixtures are reused, not copied), measure memory and threads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import testlib

REPO = Path(__file__).resolve().parents[2]
KD3 = Path(sys.executable).parent / "kd3"


def load_module(rel: str, name: str):
    """Import a helper module of another test area by its path (``tests/crawl/conftest.py`` ...)."""
    return testlib.load_module(REPO / rel, name)


def kd3(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    exe = [str(KD3)] if KD3.exists() else [sys.executable, "-m", "pipeline.app.cli"]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=cwd or REPO)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, stderr exactly one `kd3: error: ...` line naming every needle, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("kd3: error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def half_written(root: Path) -> list[Path]:
    """Files that look like the leftovers of an interrupted write (temp names of pipeline.core.io)."""
    return [p for p in Path(root).rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp." in p.name
                                                                  or p.name.endswith(".partial"))]


