"""`python -m flows.deploy` (what the docker-compose workers run on start) registers the deployments
on the kd3-cpu / kd3-gpu process work pools, with the end-to-end flow handing distill to the GPU pool."""
from __future__ import annotations


def test_register_on_work_pools(prefect_env, make_cfg):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import register

    with get_client(sync_client=True) as c:
        for pool in ("kd3-cpu", "kd3-gpu"):
            c.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    cfg = make_cfg("docker")
    ids = register(cfg, {"cpu", "gpu"}, cron="0 3 * * *")
    assert len(ids) == 4
    with get_client(sync_client=True) as c:
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
    e2e = deps["kd3-pipeline/docker"]
    assert e2e.work_pool_name == "kd3-cpu"
    assert [s.schedule.cron for s in e2e.schedules] == ["0 3 * * *"]
    assert e2e.job_variables["env"]["KD3_DISTILL_DEPLOYMENT"] == "kd3-distill/docker"
    assert deps["kd3-crawl/docker"].work_pool_name == "kd3-cpu"
    assert deps["kd3-curate/docker"].work_pool_name == "kd3-cpu"
    assert deps["kd3-distill/docker"].work_pool_name == "kd3-gpu"
    assert deps["kd3-distill/docker"].parameters["config"]["name"] == "docker"
