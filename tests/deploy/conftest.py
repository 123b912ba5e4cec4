"""The documented deployment, run for real (``make test-deploy``): Postgres, the Prefect server on it and
both workers, brought up by tools/local_stack.py from docker-compose.yml; the demo's tiny world served by
the fake web on 127.0.0.1; flow runs triggered through the API as the UI would.

One stack for the whole module (it takes ~40 s to come up); every test leaves it up and healthy for the
next, and the last fixture teardown checks that ``down`` leaves no process behind.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploylib import RUN, UNRESPONSIVE_S, Api, ls  # noqa: E402,F401


@pytest.fixture(scope="session")
def world_web(tmp_path_factory):
    """The tiny demo world, its teacher, and its pool on a fake Bing (127.0.0.1) for the session."""
    from kd3demo import world as dw
    from kd3demo.demo import DemoSettings, _resolved, demo_config, train_demo_teacher
    from kd3demo.fakeweb import FakeWeb

    out = tmp_path_factory.mktemp("world")
    s = _resolved(DemoSettings(out=out, size="tiny", epochs=1, methods=["kd3"]))
    world = dw.generate_world(out / "world", dw.spec_for("tiny", seed=0))
    teacher = train_demo_teacher(world, out, s.teacher_arch, s.teacher_epochs, 0, s.batch_size)
    pool = world.pool()
    per_query = max(sum(q.values()) for q in world.counts["web"].values())
    with FakeWeb() as web:
        dw.register_on_fakeweb(web, pool)
        cfg = demo_config(s, world, teacher, web.engine_urls()["bing"], per_query)
        data = cfg.public_dict()
        data["name"] = RUN
        data["curate"]["workers"] = 0
        data["flow"]["crawl_retries"] = 0
        path = out / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        yield {"config": path, "web": web, "data": data, "runs_root": Path(data["runs_root"]), "pool": pool}


@pytest.fixture(scope="session")
def stack(world_web, tmp_path_factory):
    """Postgres + Prefect server + the kd3-cpu and kd3-gpu workers, down (and checked gone) at the end."""
    d = tmp_path_factory.mktemp("stack")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"KD3_UNRESPONSIVE_S": str(UNRESPONSIVE_S), "KD3_WORKER_LIMIT": "2", "KD3_GPUS": "1"}.items():
            mp.setenv(k, v)
        st = ls.up(d, world_web["config"], ["cpu", "gpu"])
        try:
            yield st
        finally:
            left = ls.down(d)
    assert not left, f"processes left after down: {left}"
    assert all(not ls.group_alive(p) for p in ls._pids(st))
    assert not Path(st["pg"]["home"]).exists()


@pytest.fixture(scope="session")
def api(stack):
    """A Prefect client of the stack (basic auth), as the UI or `prefect deployment run` would use."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    e = ls.api_env(stack)
    with temporary_settings(updates={PREFECT_API_URL: e["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: e["PREFECT_API_AUTH_STRING"]}):
        yield Api()
