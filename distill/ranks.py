"""Which rank of a multi-process distill died: heartbeats in the output folder (on shared storage).

Each rank of a torchrun launch (one node or many) writes ``distill/.ranks/<out>/<session>/<rank>.json``
(host, pid, a beat counter, its state: running | done | failed: <error>) every ``BEAT_S`` seconds from a
thread, beside the output folder (which a launch that fails before its first checkpoint removes). The
session is a token rank 0 broadcasts once the process group is up, so files of an earlier launch of the
same folder (a resume) are never read as this one's.

- A rank that raises writes ``failed: <first line>`` before it exits (:func:`record_failure`).
- A rank killed by a signal or the OOM killer writes nothing: its beat stops.
- A rank whose peer's beat has not moved for ``timeout_s`` stops itself (a collective would wait for ever
  otherwise) and says which peer.
- The launcher on every node, once torchrun returns non-zero, reads the session (:func:`diagnose`) and names
  the rank that died first, in one line.

Beats are compared by their counter as seen on this machine's clock, never by another machine's time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from pipeline.core.errors import one_line
from pipeline.core.io import atomic_write_text

log = logging.getLogger("kd3.distill")

BEAT_S = 1.0
DIR = ".ranks"
_CURRENT: Optional["RankWatch"] = None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e)}"


class RankWatch:
    """This rank's heartbeat and its watch over the others (a daemon thread)."""

    def __init__(self, out_dir: Path, session: str, rank: int, world: int, timeout_s: float = 60.0,
                 beat_s: float = BEAT_S):
        self.dir = ranks_root(out_dir) / session
        self.rank, self.world, self.timeout_s, self.beat_s = rank, world, timeout_s, beat_s
        self.beat, self.state = 0, "running"
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (its last beat, when it moved, our clock)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # earlier launches of this folder: their files are not this one's
            for old in self.dir.parent.iterdir():
                if old.name != session:
                    shutil.rmtree(old, ignore_errors=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="kd3-rank-watch", daemon=True)

    def start(self) -> "RankWatch":
        global _CURRENT
        _CURRENT = self
        self._thread.start()
        return self

    def _write(self) -> None:
        with self._lock:
            info = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "beat": self.beat,
                    "state": self.state, "at": time.time()}
            atomic_write_text(self.dir / f"{self.rank}.json", json.dumps(info) + "\n")

    def finish(self, state: str = "done") -> None:
        """Last word of this rank (``done`` or ``failed: ...``); stops the thread."""
        global _CURRENT
        self._stop.set()
        if self.state == "running":
            self.state = state
        self._write()
        if _CURRENT is self:
            _CURRENT = None

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.beat_s):
            self.beat += 1
            try:
                self._write()
                dead = self._dead_peer(start)
            except OSError as e:  # shared storage hiccup: try again next beat
                log.debug("rank watch: %s", e)
                continue
            if dead is not None:
                msg = f"distill rank {self.rank}: stopping, {dead}"
                self.state = f"stopped: {dead}"
                self._write()
                log.error("%s", msg)
                os._exit(3)  # a collective with a dead peer never returns; nothing of ours is half-written

    def _dead_peer(self, start: float) -> Optional[str]:
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank:
                continue
            info = read_rank(self.dir, r)
            beat = int(info.get("beat", -1))
            last = self._seen.get(r)
            if last is None or beat != last[0]:
                self._seen[r] = (beat, now if last is not None else max(start, now))
                continue
            if str(info.get("state", "running")).startswith(("done", "failed", "stopped")):
                continue  # it said its last word; torchrun stops this rank if that was a failure
            if now - last[1] > self.timeout_s:
                return f"{describe(info, r)} has not answered for {now - last[1]:.0f} s"
        return None


def read_rank(session_dir: Path, rank: int) -> dict:
    try:
        return json.loads((session_dir / f"{rank}.json").read_text())
    except (OSError, ValueError):
        return {}


def describe(info: dict, rank: int) -> str:
    return f"rank {rank} (pid {info.get('pid', '?')} on {info.get('host', '?')})"


def record_failure(e: BaseException) -> None:
    """The running rank's last word when it raises (no-op outside a multi-process launch)."""
    if _CURRENT is not None:
        _CURRENT.finish(f"failed: {_one_line(e)}")


def ranks_root(out_dir: Path) -> Path:
    return Path(out_dir).parent / DIR / Path(out_dir).name


def latest_session(out_dir: Path) -> Optional[Path]:
    root = ranks_root(out_dir)
    sessions = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return max(sessions, key=lambda p: p.stat().st_mtime, default=None)


def diagnose(out_dir: Path, world: int, settle_s: float = 3 * BEAT_S) -> Optional[str]:
    """After a failed launch: the rank that went first, in words (None when no rank wrote anything).

    A rank still ``running`` whose beat does not move within ``settle_s`` died without a word (a signal, the
    OOM killer) and is the cause; otherwise the earliest ``failed`` rank is."""
    session = latest_session(out_dir)
    if session is None:
        return None
    first = {r: read_rank(session, r) for r in range(world)}
    time.sleep(settle_s)
    silent = []
    for r, info in first.items():
        now = read_rank(session, r)
        if info and now.get("state") == "running" and now.get("beat") == info.get("beat"):
            silent.append(f"{describe(now, r)} stopped answering without an error (killed by a signal, out of "
                          f"memory, or hung)")
        elif not info:
            silent.append(f"rank {r} never started")
    if silent:
        return silent[0]
    failed = sorted((float(i.get("at", 0)), r, i) for r, i in ((r, read_rank(session, r)) for r in range(world))
                    if str(i.get("state", "")).startswith(("failed", "stopped")))
    if failed:
        _, r, info = failed[0]
        return f"{describe(info, r)} {info['state']}"
    return None
