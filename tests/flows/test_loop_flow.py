"""`kd3 run --loop 1`: the kd3-loop flow (pipeline, then a kd3-loop-round subflow per round, a markdown
artifact per round) on the loop tests' tiny query world (fixtures reused from tests/loop/conftest.py)."""
from __future__ import annotations

from testlib import TESTS, load_module


def _loop_fixtures():
    return load_module(TESTS / "loop" / "conftest.py", "kd3_loop_conftest")


_fx = _loop_fixtures()
loop_pool, loop_web, loop_cfg = _fx.loop_pool, _fx.loop_web, _fx.loop_cfg  # tiny_teacher: tests/flows/conftest.py


def test_kd3_run_loop_runs_rounds_as_subflows_with_artifacts(prefect_env, loop_cfg, tmp_path):
    from prefect.client.orchestration import get_client

    from pipeline.app.cli import main
    from pipeline.core.config import dump_config
    from pipeline.core.records import read_loop_rounds
    from pipeline.core.runs import RunDir

    cfg = loop_cfg("flowloop")
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert main(["run", "--config", str(path), "--loop", "1"]) == 0
    rounds = read_loop_rounds(RunDir(cfg.run_dir).loop)
    assert [(r.round, r.status) for r in rounds] == [(0, "done"), (1, "done")]
    assert rounds[1].plan and rounds[1].after is not None
    with get_client(sync_client=True) as c:
        flows = {f.id: f.name for f in c.read_flows(limit=200)}
        names = {flows[r.flow_id] for r in c.read_flow_runs(limit=200)}
        keys = {a.key for a in c.read_artifacts(limit=200)}
    assert {"kd3-loop", "kd3-loop-round", "kd3-pipeline"} <= names
    assert {"kd3-loop-round-0-flowloop", "kd3-loop-round-1-flowloop"} <= keys
    # rerunning the finished loop does nothing more
    assert main(["run", "--config", str(path), "--loop", "1"]) == 0
    assert read_loop_rounds(RunDir(cfg.run_dir).loop) == rounds
