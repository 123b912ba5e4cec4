"""The Prefect API server ``kd3 run`` (and ``kd3 serve`` without ``PREFECT_API_URL``) starts for itself.

Prefect's own ephemeral server is a child in kd3's process group, so the terminal's Ctrl-C kills it at
once while the flow still needs it to record the interruption (the flow then hangs in retries). kd3
starts the same server (uvicorn on ``prefect.server.api.server:create_app``, 127.0.0.1, a free port) in
a session of its own, so a Ctrl-C reaches only kd3, which stops the flow, flushes Prefect's log and
event queues and stops the server last. The server is tied to kd3's life (``PR_SET_PDEATHSIG`` on
Linux), so even a ``kill -9`` of kd3 takes it down.

Start-up waits ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (Prefect's setting; kd3's default
180 s instead of 20 s, see ``flows/__init__.py``); past it the error says what to do.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, Optional

from pipeline.core.errors import Kd3Error

log = logging.getLogger("kd3.flows")

TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

# Runs in the server's process before uvicorn: die with the parent (the signal survives the exec), and
# give up at once if the parent is already gone.
_LAUNCH = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "uvicorn", *sys.argv[2:]])
"""


def startup_timeout() -> float:
    """Seconds to wait for the embedded server: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``."""
    raw = os.environ.get(TIMEOUT_VAR, "180")
    try:
        value = float(raw)
    except ValueError:
        raise Kd3Error(f"{TIMEOUT_VAR}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise Kd3Error(f"{TIMEOUT_VAR}={raw!r} must be more than 0 seconds")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """A temporary Prefect API server on 127.0.0.1 in its own session; ``api_url`` once started."""

    def __init__(self, timeout: Optional[float] = None):
        self.timeout = startup_timeout() if timeout is None else timeout
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: Optional[subprocess.Popen] = None

    def _env(self) -> dict[str, str]:
        from prefect.settings import get_current_settings  # heavy (Prefect): only when a server starts

        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
        env.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        env.pop("PREFECT_API_URL", None)
        return env

    def start(self) -> "EmbeddedServer":
        import prefect  # heavy: see _env

        args = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(os.getpid()), *args], env=self._env(),
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                raise Kd3Error(f"the embedded Prefect server exited with code {self.proc.returncode}"
                               f"{': ' + err[-1] if err else ''}; set PREFECT_API_URL to a running "
                               f"`prefect server start` instead")
            if self._healthy():
                log.debug("embedded Prefect server at %s (%.1fs)", self.api_url, time.monotonic() - t0)
                return self
            time.sleep(0.2)
        self.stop()
        raise Kd3Error(f"the embedded Prefect server did not answer within {self.timeout:g}s (is the machine "
                       f"busy?): raise {TIMEOUT_VAR} (e.g. 600), or start `prefect server start` in another "
                       f"shell and set PREFECT_API_URL=http://127.0.0.1:4200/api")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + "/health", timeout=2) as r:
                return r.status == 200 and json.loads(r.read() or b"null") is True
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def flush_prefect(timeout: float = 10.0) -> None:
    """Send what Prefect still queues (task/flow run events, API logs) while the server is up."""
    from prefect.events.worker import EventsWorker  # heavy (Prefect): a flow ran, so it is loaded
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=timeout, at_exit=False)


@contextlib.contextmanager
def prefect_api() -> Iterator[Optional[str]]:
    """Inside: a Prefect API to talk to. ``PREFECT_API_URL`` when set; else an :class:`EmbeddedServer`,
    stopped on the way out (also on Ctrl-C) after Prefect's queues are flushed to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings  # heavy: see _env

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    server = EmbeddedServer().start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                flush_prefect()
    finally:
        server.stop()
