"""One writer per run directory (pipeline.core.runlock): another process is refused with the holder named,
the holder's subflows re-enter, a flow handed work by the holder joins, a killed holder frees it at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.core.runlock import HOLDER_ENV, RunLocked, allow_join, read_holder, run_lock

REPO = Path(__file__).resolve().parents[2]


def hold(run_dir: Path, holder: str, join: str | None = None) -> subprocess.Popen:
    """A second process that takes the lock, says so, and sleeps until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.core.runlock import run_lock
        with run_lock({str(run_dir)!r}, {holder!r}, {join!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_another_process_is_refused_naming_the_holder(tmp_path):
    p = hold(tmp_path / "run", "flow run brave-otter (1234)")
    try:
        with pytest.raises(RunLocked, match=r"in use by flow run brave-otter \(1234\) \(pid \d+ on .*\): one run"):
            with run_lock(tmp_path / "run", "flow run second (5678)"):
                pass
        assert read_holder(tmp_path / "run")["holder"] == "flow run brave-otter (1234)"
    finally:
        p.kill()
        p.wait()


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    p = hold(tmp_path / "run", "doomed")
    p.send_signal(signal.SIGKILL)
    p.wait()
    with run_lock(tmp_path / "run", "next") as who:
        assert who == "next" and read_holder(tmp_path / "run")["holder"] == "next"


def test_reentrant_in_one_process_and_released_after_the_outermost(tmp_path):
    with run_lock(tmp_path / "run", "outer") as a:
        with run_lock(tmp_path / "run", "inner") as b:
            assert a == b == "outer"  # a subflow enters its parent's lock
        assert read_holder(tmp_path / "run")["holder"] == "outer"
    p = hold(tmp_path / "run", "after")  # released: another process takes it
    p.kill()
    p.wait()


def test_work_handed_over_by_the_holder_joins(tmp_path, monkeypatch):
    p = hold(tmp_path / "run", "flow run parent (42)")
    try:
        monkeypatch.setenv(HOLDER_ENV, "flow run parent (42)")
        with run_lock(tmp_path / "run", "flow run child (43)") as who:
            assert who == "flow run parent (42)"
        monkeypatch.setenv(HOLDER_ENV, "flow run someone-else (7)")
        with pytest.raises(RunLocked):
            with run_lock(tmp_path / "run", "flow run child (44)"):
                pass
    finally:
        p.kill()
        p.wait()


def test_cli_stage_refused_while_a_run_writes(tmp_path, capsys):
    """`kd3 curate` on a run directory a flow is writing: one line naming the holder, exit 2, nothing written."""
    import torch

    from distill.models import create_model
    from pipeline.app.cli import main
    from pipeline.core.checkpoint import save_checkpoint

    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, "cnn_tiny", ["a", "b"], 32, [0.5] * 3, [0.5] * 3, create_model("cnn_tiny", 2).state_dict())
    run = tmp_path / "runs" / "busy"
    (run / "crawl").mkdir(parents=True)
    (run / "crawl" / "records.jsonl").write_text("")
    p = hold(run, "flow run busy-bee (99)")
    try:
        before = sorted(x.name for x in run.rglob("*"))
        rc = main(["curate", "--name", "busy", "--runs-root", str(tmp_path / "runs"), "--classes", "a,b",
                   "--curate.embed_backend", "teacher", "--teacher", str(teacher)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, err
        assert len(err) == 1 and "is in use by flow run busy-bee (99)" in err[0], err
        assert sorted(x.name for x in run.rglob("*")) == before
    finally:
        p.kill()
        p.wait()


def test_a_joiner_that_comes_before_the_holder_has_written_its_note_still_joins(tmp_path):
    """The two ranks of one torchrun start together: one may find the lock taken while the other has not yet
    written who it is (the file still shows the last run's note, or nothing). It waits for the note instead of
    refusing at once; a note that never lets it in is refused after that wait."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text('{"holder": "last week\'s run", "pid": 1}\n')  # what a finished run leaves
    code = textwrap.dedent(f"""
        import fcntl, json, os, time
        fd = os.open({str(run / ".lock")!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(0.4)  # the holder's note comes late
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({{"holder": "rank 1", "pid": os.getpid(), "join": ["torchrun-x"]}}).encode(), 0)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with run_lock(run, "rank 0", join="torchrun-x") as who:
            assert who == "rank 1"
        with pytest.raises(RunLocked, match="in use by rank 1"):
            with run_lock(run, "another run", join="torchrun-y"):
                pass
    finally:
        p.kill()
        p.wait()


def test_the_nodes_of_one_multinode_distill_share_the_lock(tmp_path):
    """Every node runs `kd3 distill --nnodes N --rdzv H:P`: the first takes the lock naming the rendezvous,
    the others come with the same id and are let in; a run with another id is still refused."""
    p = hold(tmp_path / "run", "kd3 distill kd3-web-kd-1", join="kd3-web-kd-1")
    try:
        with run_lock(tmp_path / "run", "kd3 distill kd3-web-kd-1", join="kd3-web-kd-1") as who:
            assert who == "kd3 distill kd3-web-kd-1"
        with pytest.raises(RunLocked, match="in use by kd3 distill kd3-web-kd-1"):
            with run_lock(tmp_path / "run", "kd3 distill kd3-web-kd-2", join="kd3-web-kd-2"):
                pass
    finally:
        p.kill()
        p.wait()


def test_a_flow_lets_the_other_nodes_of_its_distill_in(tmp_path):
    with run_lock(tmp_path / "run", "flow run e2e (42)"):
        code = ("from pipeline.core.runlock import run_lock\n"
                f"with run_lock({str(tmp_path / 'run')!r}, 'node', join='kd3-web-kd-1') as who: print(who)")

        def node() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})

        assert "in use by flow run e2e (42)" in node().stderr  # not yet announced
        allow_join(tmp_path / "run", "kd3-web-kd-1")
        assert node().stdout.strip() == "flow run e2e (42)"
        assert read_holder(tmp_path / "run")["holder"] == "flow run e2e (42)"
    with pytest.raises(RuntimeError, match="does not hold the lock"):
        allow_join(tmp_path / "run", "x")
