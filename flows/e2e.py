"""The end-to-end flow ``kd3-pipeline``: crawl -> curate -> distill as subflows.

Each stage is cached on its inputs + code (see flows/stages.py), so rerunning the pipeline after a
distill failure skips crawl and curate, and a class already crawled to target is not crawled again.
When ``KD3_DISTILL_DEPLOYMENT`` is set (docker-compose sets it on the CPU worker), the distill stage
is handed to that deployment (the GPU worker's pool) instead of running in this process.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from prefect import flow

from prefect.deployments import run_deployment

from distill.stage import output_dir
from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.records import read_metrics
from pipeline.core.runlock import HOLDER_ENV

from flows.common import locked, md_table, publish_markdown, run_links, with_run_name
from flows.stages import crawl, curate, distill

log = logging.getLogger("kd3.flows")


def _distill_remote(cfg: RunConfig, deployment: str, holder: str) -> dict:
    """Distill on the deployment's pool (the GPU worker); that run joins this run's lock. Its result is
    read from the run directory (the contract between stages): the flow's own return value lives in the
    other worker's result storage, which this process cannot read."""
    fr = run_deployment(deployment, parameters={"config": cfg.public_dict(), "run_name": None},
                        job_variables={"env": {HOLDER_ENV: holder}}, as_subflow=True)
    if not fr.state or not fr.state.is_completed():
        raise RuntimeError(f"distill deployment {deployment} ended {fr.state.name if fr.state else 'unknown'}"
                           f"{': ' + fr.state.message if fr.state and fr.state.message else ''}")
    out = output_dir(cfg)
    return dict(read_metrics(out / "metrics.json"), out_dir=str(out.resolve()), deployment=deployment)


@flow(name="kd3-pipeline", log_prints=True)
def kd3_pipeline(config: RunConfig, run_name: Optional[str] = None) -> dict:
    """Crawl the teacher's classes, curate them into shards, distill a student: runs/<name>/."""
    cfg = with_run_name(config, run_name)
    with locked(cfg) as holder:
        save_resolved(cfg)
        log.info("kd3 pipeline: run directory %s", cfg.run_dir)
        c = crawl(cfg)
        m = curate(cfg)
        remote = os.environ.get("KD3_DISTILL_DEPLOYMENT")
        d = _distill_remote(cfg, remote, holder) if remote else distill(cfg)
    rows = [
        ["crawl", f"{sum(1 for v in c['classes'].values() if v == 'cached')}/{len(c['classes'])} classes cached"],
        ["curate", f"{m.get('nsamples')} samples kept" + (" (cached)" if m.get("cached") else "")],
        ["distill", f"top1={(d.get('final') or {}).get('top1')}" + (" (cached)" if d.get("cached") else "")],
    ]
    publish_markdown("pipeline", cfg, f"# kd3 pipeline — `{cfg.name}`\n\n" + md_table(["stage", "result"], rows)
                     + "\n\n" + run_links(cfg), f"end-to-end summary of run {cfg.name}")
    return {"crawl": c, "curate": m, "distill": d}
