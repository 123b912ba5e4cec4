"""One writer per run directory: ``runs/<name>/.lock``, held with ``flock`` and naming its holder.

Two runs of the same config (two deployment runs at once, a scheduled run over a manual one, a
``kd3 curate`` while a flow crawls) would write the same records, shards and checkpoints. The first
takes an exclusive ``flock`` on ``runs/<name>/.lock`` and writes who it is into it (holder id, host, pid,
since); the second fails at once with one line naming that holder. The kernel drops a ``flock`` when
its process dies, ``kill -9`` included, so a crashed run never leaves a lock that has to be removed by
hand; the holder text left behind is only a note.

- Within one process the lock is re-entrant: the end-to-end flow holds it and its stage subflows
  enter it again.
- A flow that the holder hands work to in *another* process (the end-to-end flow's distill on the GPU
  pool) joins the lock by naming the holder's id (``KD3_RUN_LOCK_HOLDER``); it is let in only while the
  lock is held by that very holder, which waits for it.
- The nodes of one multi-node distill all write the same output folder: the holder lists the
  rendezvous id it takes part in (``run_lock(..., join=ID)`` or :func:`allow_join`), and another process
  that comes with the same ``join`` id is let in.

``flock`` works across containers that share a volume on one host and on NFSv4 (Linux maps it to
POSIX locks), where kd3's run directories live on shared storage.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import Kd3Error

log = logging.getLogger("kd3.runlock")

LOCK_NAME = ".lock"
HOLDER_ENV = "KD3_RUN_LOCK_HOLDER"


class RunLocked(Kd3Error):
    """The run directory is being written by another run."""


_HELD: dict[Path, list] = {}  # resolved lock path -> [fd, holder, depth]
_GUARD = threading.Lock()


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve() / LOCK_NAME


def read_holder(run_dir: str | os.PathLike) -> dict:
    """What the lock file says of its (last) holder; {} when there is none or it is unreadable."""
    try:
        return json.loads(lock_path(run_dir).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def default_holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    return f"{info.get('holder', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')})"


def _take(path: Path, holder: str, join: Optional[str] = None) -> int:
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    info = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **({"join": [join]} if join else {})}
    _write(fd, info)
    return fd


def _write(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)


def allow_join(run_dir: str | os.PathLike, join: str) -> None:
    """Let the processes that come with ``join`` (a multi-node distill's rendezvous id) into the lock this
    process holds."""
    with _GUARD:
        mine = _HELD.get(lock_path(run_dir))
        if mine is None:
            if join in read_holder(run_dir).get("join", []):
                return  # this process joined the holder under that very id: it is let in already
            raise RuntimeError(f"allow_join: this process does not hold the lock of {run_dir}")
        info = read_holder(run_dir)
        if join not in info.get("join", []):
            info["join"] = [*info.get("join", []), join]
            _write(mine[0], info)


SETTLE_S = 1.0  # how long a process that finds the lock taken waits for its holder to say who it is


def _take_or_join(path: Path, root: Path, holder: str, join: Optional[str]) -> tuple[Optional[list], str]:
    """Take the lock ([fd, holder, depth], holder), or join its holder (None, the holder's id), or refuse.

    A holder writes who it is just after its ``flock``: a process that finds the lock taken in between reads
    an empty file or the previous holder's note (the two ranks of one torchrun start together). So a refusal
    stands only once the note has said the same for ``SETTLE_S``; meanwhile the lock may also come free."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            mine = _HELD[path] = [_take(path, holder, join), holder, 1]
            return mine, holder
        except BlockingIOError:
            pass
        info = read_holder(root)
        joined = os.environ.get(HOLDER_ENV)
        if join and join in info.get("join", []):
            joined = info.get("holder")
        if joined and info.get("holder") == joined:
            log.info("run directory %s: joining the lock of %s", root, joined)
            return None, joined
        if time.monotonic() >= deadline:
            raise RunLocked(f"run directory {root} is in use by {_describe(info)}: one run writes it "
                            f"at a time; wait for that run to end") from None
        time.sleep(0.05)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, holder: Optional[str] = None, join: Optional[str] = None) -> Iterator[str]:
    """Hold ``run_dir``'s lock inside; yields the holder id. Raises :class:`RunLocked` (one line naming the
    holder) when another run holds it, unless that run is ``KD3_RUN_LOCK_HOLDER`` or lets ``join`` in, which
    this one joins."""
    holder = holder or default_holder()
    root = Path(run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    with _GUARD:
        mine = _HELD.get(path)
        if mine is not None:  # re-entered by this process (a subflow of the holder)
            mine[2] += 1
        else:
            mine, holder = _take_or_join(path, root, holder, join)
    try:
        yield holder if mine is None else mine[1]
    finally:
        if mine is not None:
            with _GUARD:
                mine[2] -= 1
                if mine[2] == 0:
                    del _HELD[path]
                    os.close(mine[0])  # closing the last descriptor drops the flock
