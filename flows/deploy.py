"""Register kd3 deployments on Prefect work pools (docker-compose runs this when a worker starts).

``python -m flows.deploy --config run.yaml --pools cpu,gpu [--cron "0 3 * * *"]``

- pool ``kd3-cpu``: ``kd3-pipeline/<name>`` (the schedule, if any), ``kd3-crawl/<name>``, ``kd3-curate/<name>``;
  the end-to-end flow hands its distill stage to ``kd3-distill/<name>`` (env ``KD3_DISTILL_DEPLOYMENT``);
- pool ``kd3-gpu``: ``kd3-distill/<name>``.

Unlike ``kd3 serve`` (one process runs everything), workers pull flow runs from their pool, so the
GPU container only ever runs distillation.

It also registers the automation that marks a flow run ``Crashed`` once it stops sending heartbeats
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) for ``KD3_UNRESPONSIVE_S`` seconds: a worker killed under its run
(``kill -9``, an evicted container, a lost machine) would otherwise leave the run ``Running`` for ever.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from prefect import flow

from pipeline.core.config import RunConfig, load_config
from pipeline.core.errors import Kd3Error, report
from pipeline.core.logs import setup_logging

from flows.cli import deployment_parameters

log = logging.getLogger("kd3.flows")
REPO_ROOT = Path(__file__).resolve().parent.parent

CPU_ENTRIES = (("flows/e2e.py:kd3_pipeline", True), ("flows/stages.py:crawl", False), ("flows/stages.py:curate", False))
GPU_ENTRIES = (("flows/stages.py:distill", False),)


def register(cfg: RunConfig, pools: set[str], cron: str | None = None, prefix: str = "kd3",
             remote_distill: bool = True) -> list[str]:
    params = deployment_parameters(cfg)
    ids = []
    plan = []
    if "cpu" in pools:
        plan += [(e, f"{prefix}-cpu", sched) for e, sched in CPU_ENTRIES]
    if "gpu" in pools:
        plan += [(e, f"{prefix}-gpu", sched) for e, sched in GPU_ENTRIES]
    for entry, pool, scheduled in plan:
        fl = flow.from_source(source=str(REPO_ROOT), entrypoint=entry)
        env = ({"KD3_DISTILL_DEPLOYMENT": f"kd3-distill/{cfg.name}"}
               if entry.endswith(":kd3_pipeline") and remote_distill else {})
        dep_id = fl.deploy(name=cfg.name, work_pool_name=pool, parameters=params,
                           cron=cron if scheduled else None, job_variables={"env": env} if env else None,
                           tags=["kd3"], build=False, push=False, print_next_steps=False)
        log.info("registered %s/%s on pool %s", fl.name, cfg.name, pool)
        ids.append(str(dep_id))
    return ids


UNRESPONSIVE_AUTOMATION = "kd3: crash unresponsive flow runs"


def unresponsive_after_s() -> float:
    """``KD3_UNRESPONSIVE_S`` (default 120), which must leave room for more than one heartbeat."""
    raw = os.environ.get("KD3_UNRESPONSIVE_S", "120")
    beat = float(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or 30)
    try:
        within = float(raw)
    except ValueError:
        raise Kd3Error(f"KD3_UNRESPONSIVE_S={raw!r} is not a number of seconds") from None
    if within <= beat:
        raise Kd3Error(f"KD3_UNRESPONSIVE_S={raw} must be more than PREFECT_FLOWS_HEARTBEAT_FREQUENCY={beat:g}: "
                       f"a run would be marked Crashed between two heartbeats")
    return within


def ensure_unresponsive_automation(within_s: float) -> str:
    """Prefect's zombie-run detection (docs: "detect zombie flows"): after a flow run's heartbeat, expect
    another heartbeat or a terminal state within ``within_s``, else set the run ``Crashed``. Created once,
    updated when ``within_s`` changed; returns what it did."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in
                                                ("Completed", "Failed", "Cancelled", "Crashed"))},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=within_s))
    try:
        existing = Automation.read(name=UNRESPONSIVE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None and existing.trigger.within == trigger.within:
        return "kept"
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {within_s:g}s: its worker or machine died under it")
    if existing is None:
        Automation(name=UNRESPONSIVE_AUTOMATION, trigger=trigger, actions=[action],
                   description="kd3: marks flow runs whose process died Crashed (flows/deploy.py)").create()
        return "created"
    existing.trigger = trigger
    existing.actions = [action]
    existing.update()
    return "updated"


def check_reserved_gpus(cfg: RunConfig, where) -> None:
    """The GPU worker's container reserves ``KD3_GPUS`` GPUs; a distill takes ``flow.gpus``: equal, or a
    distill would wait for GPUs it cannot have or leave reserved ones idle."""
    reserved = os.environ.get("KD3_GPUS")
    if reserved is not None and reserved.strip() != str(cfg.flow.gpus):
        raise Kd3Error(f"KD3_GPUS={reserved} GPUs are reserved for the GPU worker but flow.gpus is {cfg.flow.gpus} "
                       f"in {where}: set them equal")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="run config YAML")
    p.add_argument("--pools", default="cpu,gpu", help="which pools to register: cpu, gpu or cpu,gpu")
    p.add_argument("--cron", help="schedule of the end-to-end deployment")
    p.add_argument("--prefix", default="kd3", help="work pool name prefix (<prefix>-cpu, <prefix>-gpu)")
    p.add_argument("--local-distill", action="store_true",
                   help="the end-to-end flow distills in its own process instead of on the GPU pool")
    args = p.parse_args(argv)
    setup_logging("INFO")
    try:
        cfg = load_config(args.config)
        pools = {x.strip() for x in args.pools.split(",") if x.strip()}
        if not pools <= {"cpu", "gpu"}:
            raise Kd3Error(f"--pools {args.pools!r}: expected cpu, gpu or cpu,gpu")
        if "gpu" in pools:
            check_reserved_gpus(cfg, args.config)
        within = unresponsive_after_s()
        register(cfg, pools, args.cron, args.prefix, remote_distill=not args.local_distill)
        log.info("automation %r (after %gs without a heartbeat): %s", UNRESPONSIVE_AUTOMATION, within,
                 ensure_unresponsive_automation(within))
    except Kd3Error as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
