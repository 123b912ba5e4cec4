"""kill -9 of a real `kd3 run` (the Prefect end-to-end flow) during its distill stage, then rerun:
the rerun takes crawl and curate from Prefect's cache (their files are not rewritten), resumes
distill from its last epoch checkpoint, and ends with a complete student."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KD3 = Path(sys.executable).parent / "kd3"
CLASSES = ["zero", "one", "two"]
EPOCHS = 40


def _digits_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == label)[:10]):
            img = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).resize((40, 40), Image.BICUBIC).convert("RGB").save(root / name / f"{j:02d}.png")
    return root


def _teacher(path: Path) -> Path:
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = create_model("cnn_tiny", len(CLASSES))
    save_checkpoint(path, "cnn_tiny", CLASSES, 32, [0.5] * 3, [0.5] * 3, net.state_dict())
    return path


def _mtimes(run: Path) -> dict[str, int]:
    files = [run / "crawl" / "records.jsonl", run / "manifest.json", *sorted((run / "shards").glob("*.tar"))]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files}


def _kd3_run(cfg: Path, env: dict, log: Path) -> subprocess.Popen:
    exe = [str(KD3)] if KD3.exists() else [sys.executable, "-m", "pipeline.app.cli"]
    return subprocess.Popen(exe + ["run", "--config", str(cfg)], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_kill9_during_flow_distill_then_rerun_uses_cached_stages(tmp_path):
    runs = tmp_path / "runs"
    cfg = {
        "name": "flowkill", "runs_root": str(runs), "classes": CLASSES,
        "teacher": str(_teacher(tmp_path / "teacher.pt")),
        "crawl": {"sources": ["folder"], "folder": str(_digits_folder(tmp_path / "digits")), "per_class": 10},
        "curate": {"embed_backend": "teacher", "device": "cpu", "workers": 0, "batch_size": 32,
                   "phash_threshold": 0, "near_dup_threshold": 1.0},
        "distill": {"method": "kd3", "student": "cnn_tiny", "epochs": EPOCHS, "batch_size": 8, "workers": 0,
                    "device": "cpu", "val_fraction": 0.0},
        "flow": {"crawl_concurrency": 2, "crawl_retries": 0},
    }
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = runs / "flowkill"

    proc = _kd3_run(cfg_path, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not list(run.glob("distill/*/checkpoint.pt")):
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and its embedded Prefect server, mid-distill
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (out_dir,) = [p.parent for p in run.glob("distill/*/checkpoint.pt")]
    assert not (out_dir / "student.pt").exists(), "distill finished before the kill: raise EPOCHS"
    before = _mtimes(run)
    leftovers = [p for p in run.rglob("*.tmp") if p.is_file()]

    proc = _kd3_run(cfg_path, env, tmp_path / "second.log")
    assert proc.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]

    assert _mtimes(run) == before  # crawl and curate came from the cache: not one of their files rewritten
    from pipeline.core.io import read_json

    metrics = read_json(out_dir / "metrics.json")
    assert metrics["final"]["done"] and len(metrics["epochs"]) == EPOCHS
    assert (out_dir / "student.pt").is_file()
    assert not [p for p in run.rglob("*.tmp") if p.is_file() and p not in leftovers]
    # a crash never leaves a half file that looks whole: every JSON the run holds parses
    for p in run.rglob("*.json"):
        read_json(p)
