"""A real Prefect server on 127.0.0.1 (temp PREFECT_HOME, sqlite), `kd3 serve` in a subprocess, and
`prefect deployment run 'kd3-pipeline/<name>' --watch` against it. Every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("crawlers.stage", reason="crawl stage not merged yet")
pytest.importorskip("distill.stage", reason="distill stage not merged yet")

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read() or b"null")


def _wait(pred, timeout: float, what: str, procs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.args[:3]} exited with {p.returncode}")
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_served_deployment_runs_to_completion(tmp_path, make_cfg):
    cfg = make_cfg("served")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.public_dict()))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "DO_NOT_TRACK": "1",
    })
    env.pop("PREFECT_API_KEY", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(server)
        _wait(lambda: _get(f"{api}/health") is True, 120, "prefect server health", procs)
        served = subprocess.Popen([str(BIN / "kd3"), "serve", "--config", str(cfg_path), "--cron", "0 3 * * *"],
                                  env=env, stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(served)
        dep = _wait(lambda: _get(f"{api}/deployments/name/kd3-pipeline/served"), 120, "served deployments", procs)
        crons = [s["schedule"].get("cron") for s in dep.get("schedules", [])]
        assert crons == ["0 3 * * *"]
        for stage in ("crawl", "curate", "distill"):  # `serve` registers the deployments one after another
            got = _wait(lambda: _get(f"{api}/deployments/name/kd3-{stage}/served"), 60, f"kd3-{stage} deployment", procs)
            assert got["name"] == "served"
        assert dep["parameters"]["config"]["name"] == "served"
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "kd3-pipeline/served",
                              "--watch", "--watch-timeout", "240"],
                             env=env, capture_output=True, text=True, timeout=300)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out + (logs / "serve.log").read_text()[-4000:]
        assert "COMPLETED" in out.upper()
        run_dir = Path(cfg.run_dir)
        assert (run_dir / "manifest.json").is_file()
        assert list(run_dir.glob("distill/*/student.pt"))
        # partial parameters merge onto the deployment's config: same run directory, 2 epochs (issue 13, 6)
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "kd3-distill/served", "--params",
                              json.dumps({"config": {"distill": {"epochs": 2}}}), "--watch", "--watch-timeout", "240"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr + (logs / "serve.log").read_text()[-4000:]
        epochs = sorted(len(json.loads(m.read_text())["epochs"]) for m in run_dir.glob("distill/*/metrics.json"))
        assert epochs == [1, 2], epochs
    finally:
        for p in reversed(procs):
            _stop(p)


# ---- the embedded server of `kd3 run` (issue 13, item 10)

def test_embedded_server_waits_long_enough_for_a_loaded_machine():
    """Prefect's own start-up timeout is 20 s, which a load average of 9 on 2 cores exceeds; kd3 sets 180 s
    (for Prefect's server too, when kd3 starts it in-process) unless the user sets the variable."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = ("import flows, flows.server as s; "
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as t; "
            "print(s.startup_timeout(), t.value())")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["180.0", "180"]
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600"),
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert r.stdout.split() == ["600.0", "600"]


def test_embedded_server_timeout_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """A server that is not up in time: one line naming the setting to raise and the alternative; the
    half-started server is stopped."""
    from flows.server import EmbeddedServer
    from pipeline.app.cli import main
    from pipeline.core.errors import Kd3Error

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    server = EmbeddedServer(timeout=0.05)
    with pytest.raises(Kd3Error) as ei:
        server.start()
    msg = str(ei.value)
    assert "did not answer within 0.05s" in msg and "\n" not in msg
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in msg and "PREFECT_API_URL" in msg
    assert server.proc is None  # stopped, not left behind
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "soon")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["run", "--classes", "cat", "--set", f"runs_root={tmp_path}"]) == 2
    assert not (tmp_path / "default").exists()
