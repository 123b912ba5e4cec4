"""Distill across machines: two torchrun "nodes" on 127.0.0.1 (gloo) meeting at a c10d rendezvous.

Each node is a separate ``kd3 distill --nnodes 2 --rdzv 127.0.0.1:PORT`` process, as a user starts one per
machine; the run directory is shared (here: the same folder).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill.stage import distill
from pipeline.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
KD3 = [sys.executable, "-m", "pipeline.app.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(world, run: Path, tmp: Path, **d) -> Path:
    """No batch statistics in the student (LayerNorm) and no random augmentation: then two ranks of half
    the batch compute what one process computes on the whole batch."""
    dd = {"method": "kd", "student": "cnn_tiny_ln", "epochs": 2, "batch_size": 32, "workers": 0, "device": "cpu",
          "val_fraction": 0.1, "augment": "none", "lr": 0.05, "channels_last": False}
    dd.update(d)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({"name": run.name, "runs_root": str(run.parent), "teacher": str(world["teacher"]),
                                    "distill": dd}))
    return path


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _node(cfg: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*KD3, "distill", "--config", str(cfg), "--nnodes", "2", "--rdzv", f"127.0.0.1:{port}",
                             "--out-id", "nodes", *extra], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out


@pytest.fixture()
def run(digits_world, tmp_path):
    r = tmp_path / "runs" / "web"
    shutil.copytree(digits_world["run"], r)
    return r


def test_two_nodes_train_what_one_process_trains(digits_world, run, tmp_path):
    cfg_path = _config(digits_world, run, tmp_path)
    torch.set_num_threads(1)
    one = distill(load_config(cfg_path), out_id="one")
    port = _free_port()
    results = _finish([_node(cfg_path, port), _node(cfg_path, port)])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    out = run / "distill" / "kd-nodes"
    two = json.loads((out / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["final"]["done"]
    assert not (run / ".prefect").exists() or not list((run / ".prefect").glob("distill-config-*.yaml"))
    # the same global batch of 32 (16 per rank), the same data order: the same student, to float tolerance
    a = torch.load(run / "distill" / "kd-one" / "student.pt", map_location="cpu", weights_only=False)
    b = torch.load(out / "student.pt", map_location="cpu", weights_only=False)
    sa, sb = a.get("state_dict", a), b.get("state_dict", b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]) and sa[k].is_floating_point():
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
    for e1, e2 in zip(one["epochs"], two["epochs"]):
        assert e1["trained"] == e2["trained"]
        assert e2["losses"]["total"] == pytest.approx(e1["losses"]["total"], rel=1e-4)
    assert two["final"]["top1"] == pytest.approx(one["final"]["top1"], abs=1e-9)
    assert "kd3 distill: kd cnn_tiny_ln" in results[0][1] + results[1][1]


def test_a_rank_that_dies_stops_the_other_with_one_line_naming_it(digits_world, run, tmp_path):
    cfg_path = _config(digits_world, run, tmp_path, epochs=50)
    port = _free_port()
    nodes = [_node(cfg_path, port), _node(cfg_path, port)]
    ranks_dir = run / "distill" / ".ranks" / "kd-nodes"
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None:  # both ranks beating: kill rank 1 like the OOM killer would
        files = list(ranks_dir.glob("*/1.json"))
        if files:
            info = json.loads(files[0].read_text())
            if info.get("beat", 0) >= 2:
                victim = info
        time.sleep(0.2)
    assert victim is not None, "the ranks never started beating"
    os.kill(victim["pid"], signal.SIGKILL)
    results = _finish(nodes, timeout=120)
    for rc, _, err in results:
        assert rc == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("kd3: error: distill rank 1 (pid %d on " % victim["pid"]), err[-3000:]
        assert "stopped answering without an error" in last and "the other ranks stopped" in last
        assert "Traceback" not in err  # torchrun's account is in its log file, not on the terminal
    assert list(ranks_dir.glob("torchrun-*.log"))


def test_nodes_need_a_rendezvous(digits_world, run, tmp_path, capsys):
    from pipeline.app.cli import main

    cfg_path = _config(digits_world, run, tmp_path)
    assert main(["distill", "--config", str(cfg_path), "--nnodes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs rdzv: HOST:PORT" in err[0], err
    assert main(["distill", "--config", str(cfg_path), "--nnodes", "2", "--rdzv", "nohost"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--rdzv" in err and "HOST:PORT" in err


@pytest.mark.parametrize("how", ["kd3 --nproc-per-node 2", "a torchrun of your own"])
def test_two_ranks_on_one_machine_share_the_run_lock(digits_world, run, tmp_path, how):
    """`kd3 distill --nproc-per-node 2` runs torchrun --standalone itself; a user's own `torchrun ... -m
    pipeline.app.cli distill` starts two CLIs, whose ranks join one lock instead of refusing each other."""
    cfg_path = _config(digits_world, run, tmp_path, epochs=1)
    if how.startswith("kd3"):
        cmd = [*KD3, "distill", "--config", str(cfg_path), "--nproc-per-node", "2", "--out-id", "two"]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
               "pipeline.app.cli", "distill", "--config", str(cfg_path), "--out-id", "two"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run / "distill" / "kd-two" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["final"]["done"]
    assert "in use by" not in p.stderr


def test_a_hung_rank_is_named_after_rank_timeout_s(digits_world, run, tmp_path):
    """A rank that hangs (SIGSTOP: alive, silent) would leave its peer in a collective for ever: the peer's
    watch stops it after flow.rank_timeout_s and its node ends in one line naming the hung rank."""
    cfg_path = _config(digits_world, run, tmp_path, epochs=50)
    data = yaml.safe_load(cfg_path.read_text())
    cfg_path.write_text(yaml.safe_dump({**data, "flow": {"rank_timeout_s": 4}}))
    port = _free_port()
    nodes = [_node(cfg_path, port), _node(cfg_path, port)]
    ranks_dir = run / "distill" / ".ranks" / "kd-nodes"
    deadline, victim = time.time() + 120, None
    while time.time() < deadline and victim is None:
        files = list(ranks_dir.glob("*/1.json"))
        if files:
            info = json.loads(files[0].read_text())
            victim = info if info.get("beat", 0) >= 2 else None
        time.sleep(0.2)
    assert victim is not None, "the ranks never started beating"
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        t0 = time.time()
        survivor = None
        while survivor is None and time.time() - t0 < 90:
            survivor = next((n for n in nodes if n.poll() is not None), None)
            time.sleep(0.5)
        assert survivor is not None, "no node stopped within 90 s of the hang"
        _, err = survivor.communicate()
        last = err.strip().splitlines()[-1]
        assert survivor.returncode == 1 and last.startswith("kd3: error: distill rank 1 (pid %d on " % victim["pid"])
        assert "stopped answering" in last and "hung" in last
    finally:
        os.kill(victim["pid"], signal.SIGKILL)
        _finish(nodes, timeout=60)
