"""kill -9 a real `kd3 distill` after its first epoch checkpoint, at a random moment, then `--resume`:
it finishes with the same epochs, selections and final losses as an uninterrupted run, and no file is
half written."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.io import read_jsonl

from reliability_helpers import KD3, REPO, half_written, kd3, load_module

ART = load_module("tests/reliability/test_artifacts.py", "kd3_rel_artifacts")
SEED = int(os.environ.get("KD3_FAULT_SEED", random.SystemRandom().randrange(10**6)))
EPOCHS = 3


def _args(run: Path, teacher: Path, out_id: str) -> list[str]:
    return ["distill", "--run", str(run), "--classes", "zero,one", "--teacher", str(teacher), "--method", "kd3",
            "--student", "cnn_tiny", "--epochs", str(EPOCHS), "--distill.device", "cpu", "--distill.workers", "0",
            "--distill.batch_size", "8", "--distill.val_fraction", "0", "--out-id", out_id]


def test_kill9_mid_distill_then_resume(tmp_path):
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "cnn_tiny", ART.CLASSES, 16, [0.5] * 3, [0.5] * 3,
                    create_model("cnn_tiny", 2).state_dict())
    run = tmp_path / "runs" / "r"
    ART._write_run(run, n=160)
    full = kd3(*_args(run, teacher, "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    out = run / "distill" / "kd3-cut"
    epoch_s = min(e["time_s"] for e in json.loads((run / "distill" / "kd3-full" / "metrics.json").read_text())["epochs"])
    delay = random.Random(SEED).uniform(0.0, 0.8 * epoch_s)  # somewhere inside the second epoch
    log = open(tmp_path / "cut.log", "w")
    exe = [str(KD3)] if KD3.exists() else [sys.executable, "-m", "pipeline.app.cli"]
    proc = subprocess.Popen(exe + _args(run, teacher, "cut"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        t_end = time.monotonic() + 240
        while time.monotonic() < t_end and proc.poll() is None and not (out / "checkpoint.pt").exists():
            time.sleep(0.02)
        time.sleep(delay)  # a random moment after the first epoch checkpoint
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    if not killed:
        pytest.skip(f"seed {SEED}: the run finished before the kill (delay {delay:.2f}s)")
    if (out / "student.pt").exists():
        pytest.skip(f"seed {SEED}: the run finished before the kill (delay {delay:.2f}s)")
    # a plain rerun refuses to overwrite the unfinished run; --resume continues it
    r = kd3(*_args(run, teacher, "cut"))
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr[-2000:]
    r = kd3(*_args(run, teacher, "cut"), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]

    a = json.loads((run / "distill" / "kd3-full" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in b["epochs"]] == list(range(EPOCHS))
    assert [r["epoch"] for r in read_jsonl(out / "selection.jsonl")] == list(range(EPOCHS))
    assert [e["selected"] for e in b["epochs"]] == [e["selected"] for e in a["epochs"]], f"seed {SEED}"
    assert b["epochs"][-1]["losses"] == pytest.approx(a["epochs"][-1]["losses"], rel=1e-4), f"seed {SEED}"
    sa = torch.load(run / "distill" / "kd3-full" / "student.pt", weights_only=True)["state_dict"]
    sb = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)
    assert half_written(out) == []
