"""The stack docker-compose.yml describes, run for real: deployments triggered through the API on
Postgres, workers polling their pools, and the faults a deployment meets (issue 20).

Every time this module measures (seconds to recover, runs completed) is printed in one ``deploy:`` line
per test (``pytest -s``) for docs/BENCHMARKS.md's table; no assertion is on a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from deploylib import REPO, RUN, UNRESPONSIVE_S, ls

pytestmark = pytest.mark.deploy


def report(name: str, **numbers) -> None:
    print(f"\ndeploy: {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


def files_of(run_dir: Path) -> set[str]:
    """A run directory's files, relative, with the run's name and the distill output id generalised
    (Prefect's result store and the lock aside)."""
    out = set()
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir)
        if p.is_file() and rel.parts[0] not in (".prefect", ".lock"):
            parts = list(rel.parts)
            if parts[0] == "distill":
                parts[1] = parts[1].split("-")[0]
            out.add("/".join(parts).replace(run_dir.name, "<run>"))
    return out


def psql(stack: dict, sql: str) -> str:
    pg = stack["pg"]
    r = subprocess.run([*ls._as_pg_user(), str(Path(pg["bin"]) / "psql"), "-h", pg["home"], "-p", str(pg["port"]),
                        "-d", "prefect", "-tAc", sql], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def ok_records(run_dir: Path) -> list[dict]:
    from pipeline.core.io import read_jsonl

    return [r for r in read_jsonl(run_dir / "crawl" / "records.jsonl") if r.get("status") == "ok"]


def check_store(run_dir: Path) -> None:
    """No image recorded twice, no record without its file, no file without its record."""
    ok = ok_records(run_dir)
    urls = Counter((r["class"], r["url"]) for r in ok)
    assert max(urls.values()) == 1, [u for u, n in urls.items() if n > 1]
    stored = {p.stem for p in (run_dir / "crawl" / "images").rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert {r["sha256"] for r in ok} == stored


def image_gets(web) -> Counter:
    return Counter(web.requested_paths("/img/"))


# ---------------------------------------------------------------------------------------------- runs

def test_pipeline_deployment_on_postgres(stack, api, world_web):
    """kd3-pipeline/<name> triggered through the API completes on the CPU worker, its distill handed to the
    GPU pool; the run directory holds what `kd3 run` makes; runs, task runs and artifacts are in Postgres."""
    ref = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "run", "--config", str(world_web["config"]),
                            "--name", "reference"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    fr = api.trigger(f"kd3-pipeline/{RUN}")
    fr = api.wait(fr.id)
    took = time.monotonic() - t0
    out, _ = ref.communicate(timeout=600)
    assert fr.state.is_completed(), fr.state.message
    assert ref.returncode == 0, out[-2000:]
    run_dir = world_web["runs_root"] / RUN
    assert files_of(run_dir) == files_of(world_web["runs_root"] / "reference")
    assert (run_dir / "manifest.json").is_file() and list((run_dir / "distill").glob("kd3-*/student.pt"))
    with api.client() as c:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        subflows = c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr.id])))
        flows = {c.read_flow(s.flow_id).name: s for s in subflows}
        assert {"kd3-crawl", "kd3-curate", "kd3-distill"} <= set(flows)
        assert flows["kd3-distill"].work_pool_name == "kd3-gpu" and fr.work_pool_name == "kd3-cpu"
        task_runs = c.read_task_runs()
        arts = {a.key for a in c.read_artifacts()}
    assert {f"kd3-{s}-{RUN}" for s in ("crawl", "curate", "distill", "pipeline")} <= arts
    assert any(t.name.startswith("crawl-class-") for t in task_runs)
    # ... and they are rows of the Postgres database, not of a SQLite file
    assert psql(stack, f"select state_type from flow_run where id = '{fr.id}'") == "COMPLETED"
    assert int(psql(stack, f"select count(*) from task_run where flow_run_id = '{flows['kd3-crawl'].id}'")) > 0
    assert int(psql(stack, f"select count(*) from artifact where key = 'kd3-pipeline-{RUN}'")) >= 1
    report("pipeline", seconds=round(took, 1), subflows=len(subflows))


def test_distill_deployment_on_the_gpu_pool(api, world_web):
    """kd3-distill/<name> with a changed distill.epochs runs on kd3-gpu over the same run directory."""
    fr = api.wait(api.trigger(f"kd3-distill/{RUN}", config={"distill": {"epochs": 2}}).id)
    assert fr.state.is_completed(), fr.state.message
    assert fr.work_pool_name == "kd3-gpu"
    from pipeline.core.io import read_json

    runs = [read_json(p) for p in (world_web["runs_root"] / RUN / "distill").glob("kd3-*/metrics.json")]
    assert sorted(len(m["epochs"]) for m in runs) == [1, 2], [m.get("epochs") for m in runs]


# ---------------------------------------------------------------------------------------------- faults

def _slow_crawl() -> dict:
    """Partial parameters (merged onto the deployment's config): a crawl slow enough to fault mid-way."""
    return {"crawl": {"rate_limit_per_domain": 3.0, "threads": 2}}


def _wait_records(run_dir: Path, n: int, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (run_dir / "crawl" / "records.jsonl").is_file() and len(ok_records(run_dir)) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir}: fewer than {n} crawled images after {timeout}s")


def test_worker_killed_mid_crawl(stack, api, world_web):
    """kill -9 of the CPU worker's process group and of the flow run below it (the process worker starts
    each run in a session of its own), as when the worker's container dies, mid-crawl: the run is marked
    Crashed by the unresponsive-run automation (no heartbeat), the restarted worker runs the deployment
    again, and nothing is downloaded twice or lost. (Killing the worker's group alone leaves the flow run
    process, which Prefect ends Crashed itself once its worker is gone.)"""
    name = "killed"
    run_dir = world_web["runs_root"] / name
    before = image_gets(world_web["web"])
    fr = api.trigger(f"kd3-pipeline/{RUN}", config=_slow_crawl(), run_name=name)
    _wait_records(run_dir, 15)
    n_before = len(ok_records(run_dir))
    worker = stack["workers"]["cpu"]["pid"]
    assert ls.descendants(worker), "the worker had no flow run process below it"
    assert ls.stop_group(worker, grace_s=0, sig=9) == []  # what a container's death does
    t_kill = time.monotonic()
    ls.worker_start(stack, "cpu")
    crashed = api.wait(fr.id, timeout=UNRESPONSIVE_S + 180)
    t_crashed = time.monotonic() - t_kill
    assert crashed.state.is_crashed(), crashed.state
    assert "no heartbeat" in (crashed.state.message or ""), crashed.state.message  # kd3's automation did it
    assert len(ok_records(run_dir)) >= n_before  # nothing lost
    again = api.wait(api.trigger(f"kd3-pipeline/{RUN}", config=_slow_crawl(), run_name=name).id)
    assert again.state.is_completed(), again.state.message
    check_store(run_dir)
    gets = image_gets(world_web["web"]) - before
    twice = [p for p, k in gets.items() if k > 1]
    threads = 2
    assert len(twice) <= threads, twice  # at most the downloads in flight when the worker died
    report("kill -9 worker", crashed_after_s=round(t_crashed, 1), why=repr(crashed.state.message), images_before_kill=n_before,
           images=len(ok_records(run_dir)), fetched_twice=len(twice))


def _recovers(api, stack, run_dir: Path, name: str, fault, what: str) -> None:
    fr = api.trigger(f"kd3-pipeline/{RUN}", config=_slow_crawl(), run_name=name)
    _wait_records(run_dir, 10)
    t_up = fault()
    end = api.wait(fr.id, timeout=600)
    assert end.state.is_final()
    nxt = api.wait(api.trigger(f"kd3-pipeline/{RUN}", run_name=name).id, timeout=600)
    assert nxt.state.is_completed(), nxt.state.message
    check_store(run_dir)
    assert all(ls.alive(w["pid"]) for w in stack["workers"].values())  # no worker needed a restart
    report(what, api_back_after_s=round(t_up, 1), faulted_run=end.state.name, next_run=nxt.state.name)


def test_postgres_down_20s(stack, api, world_web):
    """Postgres stopped for 20 s mid-run, then started: server and workers recover by themselves."""
    name = "pgdown"

    def fault() -> float:
        ls.pg_stop(stack)
        time.sleep(20)
        ls.pg_start(stack)
        t0 = time.monotonic()
        url = ls.api_env(stack)["PREFECT_API_URL"]
        while not ls.http_ok(url + "/work_pools/kd3-cpu", stack["auth"]):
            time.sleep(0.5)
        return time.monotonic() - t0

    _recovers(api, stack, world_web["runs_root"] / name, name, fault, "postgres down 20s")


def test_server_restarted(stack, api, world_web):
    """The Prefect server stopped and started again mid-run (same port): the run and the workers go on."""
    name = "restarted"

    def fault() -> float:
        ls.stop_group(stack["server"]["pid"])
        return ls.server_start(stack)

    _recovers(api, stack, world_web["runs_root"] / name, name, fault, "server restarted")


def test_two_runs_of_one_config(stack, api, world_web):
    """Two deployment runs of the same run at once: one writes, the other fails naming the holder."""
    name = "twice"
    a = api.trigger(f"kd3-pipeline/{RUN}", config=_slow_crawl(), run_name=name)
    b = api.trigger(f"kd3-pipeline/{RUN}", config=_slow_crawl(), run_name=name)
    ends = [api.wait(a.id), api.wait(b.id)]
    states = sorted(e.state.type.value for e in ends)
    assert states == ["COMPLETED", "FAILED"], [(e.state.name, e.state.message) for e in ends]
    failed = next(e for e in ends if e.state.is_failed())
    done = next(e for e in ends if e.state.is_completed())
    assert "is in use by flow run" in failed.state.message and str(done.id) in failed.state.message
    run_dir = world_web["runs_root"] / name
    check_store(run_dir)
    from distill.data import verify_shards

    assert verify_shards(run_dir / "manifest.json")  # every shard's sha256 as the manifest says
    report("two runs at once", completed=1, refused=1)


def test_worker_with_a_wrong_auth_string(stack):
    """A worker given the wrong PREFECT_API_AUTH_STRING stops at once with one line naming the problem."""
    svc = ls.compose_services(ls.compose_env(stack))["worker-cpu"]
    env = ls.process_env(svc["environment"], stack, {"PREFECT_API_AUTH_STRING": "kd3:wrong"})
    t0 = time.monotonic()
    r = subprocess.run(ls.local_command(svc["command"], stack), env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0
    assert len(lines) == 1 and "401 Unauthorized" in lines[0] and "PREFECT_API_AUTH_STRING" in lines[0], r.stderr
    report("wrong auth string", exit=r.returncode, seconds=round(time.monotonic() - t0, 1))


def test_worker_that_cannot_register(stack, tmp_path):
    """A worker whose config cannot be registered (its GPUs differ from flow.gpus) ends `up` in one line."""
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(Path(stack["config"]).read_text()), "flow": {"gpus": 2}}))
    st = {**stack, "config": str(bad), "workers": {}, "dir": str(tmp_path)}
    with pytest.raises(ls.StackError, match=r"the gpu worker exited before it was ready: .*KD3_GPUS=1.*flow.gpus is 2"):
        ls.worker_start(st, "gpu")
    assert not ls.group_alive(st["workers"]["gpu"]["pid"])
