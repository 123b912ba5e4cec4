"""`python -m flows.deploy` (what the docker-compose workers run on start) registers the deployments
on the kd3-cpu / kd3-gpu process work pools, with the end-to-end flow handing distill to the GPU pool."""
from __future__ import annotations

from typing import Optional


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


def _probe_flow():
    """A flow with kd3's flow signature that returns the config its run resolves."""
    from prefect import flow

    from flows.common import with_run_name
    from pipeline.core.config import RunConfig

    def probe(config: RunConfig, run_name: Optional[str] = None) -> dict:
        return with_run_name(config, run_name).public_dict()

    probe.__annotations__ = {"config": RunConfig, "run_name": Optional[str], "return": dict}
    return flow(name="kd3-probe")(probe)


def test_partial_parameters_merge_onto_the_deployments_config(prefect_env, make_cfg, tmp_path):
    """`prefect deployment run 'kd3-distill/x' --params '{"config": {"distill": {"epochs": 3}}}'`: Prefect
    replaces the `config` parameter whole; kd3 lays the given fields over the deployment's config, so the
    run keeps its name, runs_root, teacher and classes (issue 13, item 6)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.cli import deployment_parameters
    from flows.common import with_run_name

    probe = _probe_flow()
    cfg = make_cfg("deployed", **{"distill.epochs": 7, "crawl.per_class": 9})
    dep_id = probe.to_deployment(name="deployed", parameters=deployment_parameters(cfg)).apply()
    with get_client(sync_client=True) as c:
        fr = c.create_flow_run_from_deployment(dep_id, parameters={"config": {"distill": {"epochs": 3}}})
    assert fr.parameters["config"] == {"distill": {"epochs": 3}}  # what Prefect hands the flow
    got = run_flow(probe, flow_run=fr, parameters=fr.parameters, return_type="result")
    want = deployment_parameters(cfg)["config"]
    assert got["distill"]["epochs"] == 3
    assert got["name"] == "deployed" and got["runs_root"] == want["runs_root"]
    assert got["teacher"] == want["teacher"] and got["classes"] == want["classes"]
    assert got["crawl"]["per_class"] == 9 and got["distill"]["student"] == "cnn_tiny"
    # outside a deployment run the config is taken as given
    assert with_run_name({"distill": {"epochs": 3}}, None).name == "default"
