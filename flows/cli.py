"""``kd3 run`` and ``kd3 serve``: the Prefect side of the CLI (``pipeline.app.cli`` calls in here).

``kd3 run --config run.yaml``            end-to-end flow against a temporary Prefect server of kd3's own
                                          (flows/server.py; PREFECT_API_URL when set)
``kd3 run --run runs/x --stage distill`` rerun only that stage on an existing run (cache ignored)
``kd3 run --config run.yaml --loop 3``   the pipeline, then 3 rounds of the crawl-selection loop (``kd3-loop``)
``kd3 serve --config run.yaml --cron "0 3 * * *"``
                                          deployments ``kd3-pipeline/<name>`` (scheduled), ``kd3-crawl/<name>``,
                                          ``kd3-curate/<name>``, ``kd3-distill/<name>`` served by this process;
                                          trigger with ``prefect deployment run 'kd3-pipeline/<name>'``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from prefect.runner import Runner
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from pipeline.core.config import RunConfig, absolute_config
from pipeline.core.errors import ConfigError

from flows.e2e import kd3_pipeline
from flows.loop import kd3_loop
from flows.server import prefect_api
from flows.stages import STAGE_FLOWS

log = logging.getLogger("kd3.flows")
STOP_GRACE_S = float(os.environ.get("KD3_STOP_GRACE_S", "10"))


def deployment_parameters(cfg: RunConfig) -> dict[str, Any]:
    """Default parameters of a deployment: the config, absolute paths, secrets removed (they come from env)."""
    return {"config": absolute_config(cfg).public_dict(), "run_name": None}


def run_cli(cfg: RunConfig, args) -> int:
    """``kd3 run``: the flow against ``PREFECT_API_URL`` or a server of kd3's own, stopped last."""
    stage = getattr(args, "stage", None)
    rounds = getattr(args, "loop", None)
    if rounds is not None:
        if stage is not None:
            raise ConfigError("--loop runs every stage: leave out --stage")
        if rounds < 0:
            raise ConfigError(f"--loop {rounds}: the number of rounds must be >= 0")
        cfg.loop.rounds = rounds
    if stage is not None and stage not in STAGE_FLOWS:
        raise ConfigError(f"--stage {stage!r}: expected one of {sorted(STAGE_FLOWS)}")
    if stage not in (None, "crawl") and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"--stage {stage}: run directory {cfg.run_dir} does not exist (run the earlier stages first)")
    with prefect_api():
        if rounds is not None:
            kd3_loop(cfg)
            log.info("kd3 loop finished: %s (rounds in %s)", cfg.run_dir, Path(cfg.run_dir) / "loop")
        elif stage is None:
            kd3_pipeline(cfg)
            log.info("kd3 pipeline finished: %s", cfg.run_dir)
        else:
            STAGE_FLOWS[stage](cfg, force=True)
            log.info("kd3 stage %s finished: %s", stage, cfg.run_dir)
    return 0


def build_deployments(cfg: RunConfig, cron: str | None = None) -> list:
    params = deployment_parameters(cfg)
    # module entrypoints (flows.e2e.kd3_pipeline): the installed package, wherever the process runs
    mod = EntrypointType.MODULE_PATH
    deps = [kd3_pipeline.to_deployment(name=cfg.name, parameters=params, cron=cron, tags=["kd3"],
                                       description=f"kd3 end-to-end run {cfg.name}", entrypoint_type=mod)]
    deps.append(kd3_loop.to_deployment(name=cfg.name, parameters=params, tags=["kd3", "loop"],
                                       description=f"kd3 crawl-selection loop of run {cfg.name}", entrypoint_type=mod))
    for stage, fl in STAGE_FLOWS.items():
        deps.append(fl.to_deployment(name=cfg.name, parameters=params, tags=["kd3", stage],
                                     description=f"kd3 {stage} stage of run {cfg.name}", entrypoint_type=mod))
    return deps


class _Runner(Runner):
    """Prefect's runner, bounded on SIGTERM: its graceful stop talks to the API (pause schedules, cancel
    runs), which waits forever once the server is gone; kd3 exits after ``KD3_STOP_GRACE_S`` regardless."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        log.info("SIGTERM: stopping (at most %gs)", STOP_GRACE_S)
        timer = threading.Timer(STOP_GRACE_S, lambda: os._exit(143))
        timer.daemon = True
        timer.start()
        super().handle_sigterm(*args, **kwargs)


def serve_cli(cfg: RunConfig, args) -> int:
    cron = getattr(args, "cron", None)
    if cron:
        try:
            from croniter import croniter  # optional: ships with Prefect

            if not croniter.is_valid(cron):
                raise ConfigError(f"--cron {cron!r} is not a valid cron expression")
        except ImportError:  # pragma: no cover - croniter ships with prefect
            pass
    if not PREFECT_API_URL.value():
        log.warning("PREFECT_API_URL is not set: serving against a temporary embedded server that "
                    "`prefect deployment run` from another shell cannot reach; start `prefect server start` "
                    "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    with prefect_api():
        deps = build_deployments(cfg, cron)
        runner = _Runner(pause_on_shutdown=True, limit=int(os.environ.get("KD3_SERVE_LIMIT", "4")))
        for dep in deps:
            runner.add_deployment(dep)
        log.info("serving %s", ", ".join(f"{d.flow_name}/{d.name}" for d in deps))
        try:
            asyncio.run(runner.start())
        except KeyboardInterrupt:
            log.info("interrupted: stopping")
    return 0
