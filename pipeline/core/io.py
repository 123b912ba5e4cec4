"""Atomic file writes, append-only JSONL logs and hashing.

Every file kd3 writes goes through here: written to a temporary name in the same
folder, flushed, fsynced and renamed, so a crash never leaves a half file that looks
whole; the file gets the mode the umask gives any new file (0644 under 0022). Append-only logs (crawl records) are the one exception: a crash can tear only
their last line, and :func:`read_jsonl` skips a torn last line.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

CHUNK = 1 << 20
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), else by the set-and-restore dance
    under a lock; files kd3 creates get ``0o666 & ~umask`` like any ``open(path, "w")``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    With ``overwrite=False`` an existing ``path`` is kept (content-addressed stores).
    ``durable=False`` skips the two fsyncs (file, folder): a crashed process still never leaves a half
    file, but a power cut may; for bulk writes that the caller makes durable at once (:func:`sync_all`)
    before anything names them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    _LIVE_TMP.add(tmp_path)
    try:
        try:  # mkstemp makes the file 0600; the file kd3 leaves is readable as the umask says
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        if not overwrite and path.exists():
            tmp_path.unlink()
        else:
            os.replace(tmp_path, path)
            if durable:
                _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    finally:
        _LIVE_TMP.discard(tmp_path)


# Temporary files of writes still in progress. A Ctrl-C ends the main thread's writes through the
# ``except`` above, but a write in a worker thread (a flow's task runner) dies with the interpreter;
# at exit nothing half-written may stay behind, so whatever is still listed here is removed.
_LIVE_TMP: set[Path] = set()


@atexit.register
def _remove_unfinished_writes() -> None:
    for tmp in list(_LIVE_TMP):
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True, durable: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sync_all() -> None:
    """Make every write so far durable (one ``sync``; after a bulk of ``durable=False`` writes)."""
    os.sync()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn (unparseable) *last* line from a crash is skipped."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The rows of a JSONL file, one line in memory at a time (a pool's logs run to 10^6 lines); a torn
    (unparseable) *last* line from a crash is skipped, a bad line elsewhere is an error naming it."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        bad = None  # a line that did not parse: fine only if it is the last one
        for i, line in enumerate(fh, 1):
            if bad is not None:
                raise ValueError(f"{path}: line {bad} is not valid JSON")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad = i
                continue
            yield row


class JsonlAppender:
    """Append-only JSONL log, flushed to the OS per row (a killed process loses nothing written) and fsynced
    every ``sync_every`` rows, or with ``sync_s`` at most once per ``sync_s`` seconds, and at close.

    Thread-safe for one process (a lock around each write). If the file ends with a
    torn line (crash mid-write) it is truncated back to the last complete line first.
    """

    def __init__(self, path: str | os.PathLike, sync_every: int = 1, sync_s: float | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._n = 0
        self.sync_every = max(1, sync_every)
        self.sync_s = sync_s
        self._synced = time.monotonic()

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            fh.truncate(cut)

    def write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            self._n += 1
            if self.sync_s is not None:
                if time.monotonic() - self._synced >= self.sync_s:
                    os.fsync(self._fh.fileno())
                    self._synced = time.monotonic()
            elif self._n % self.sync_every == 0:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
