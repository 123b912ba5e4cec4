"""The crawl-selection loop ``kd3-loop`` (``kd3 run --loop N``): what distillation selected tells the
crawl what to fetch next.

Round 0 is the end-to-end pipeline (crawl -> curate -> distill). Each later round:

1. **yield** of the last distill run per query class (:func:`pipeline.core.yields.yield_table`): kept,
   selected in the last epochs, their ratio, held-out agreement; classes below ``loop.min_selected`` are
   starved;
2. **plan**: ``loop.budget_per_round`` downloads shared by the starved classes, each class's share spread
   over its most productive query and untried ones (:func:`crawlers.expand.plan_class`);
3. **crawl** the plan through the crawl stage (:func:`crawlers.stage.crawl_planned`: every URL recorded in
   ``crawl/records.jsonl``), **curate** the grown pool (the facts/embedding cache embeds only the new
   images; the decisions are made again over the whole pool), **distill** on it, starting from the last
   round's student (``loop.distill: continue``) or from scratch (``restart``).

It stops after ``loop.rounds`` rounds, when no class is starved, or when a round adds fewer than
``loop.min_new`` kept images. State: ``loop/round-NNN.json``, rewritten atomically as each round moves
through started -> crawled -> curated -> done, so a stopped loop resumes where it was (each stage resumes
on its own too). The plain driver :func:`run_loop` does everything without Prefect; the flow wraps the same
steps (each round a subflow ``kd3-loop-round``, a markdown artifact per round).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from prefect import flow, task

from crawlers.expand import PlannedQuery, plan_class, split_budget
from crawlers.source import query_sources
from crawlers.stage import crawl as crawl_fn
from crawlers.stage import crawl_planned
from distill.stage import default_out_id, output_dir
from distill.stage import distill as distill_fn
from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.errors import ConfigError
from pipeline.core.records import LoopRound, YieldTable, downloads_per_class, read_decisions, read_loop_rounds, \
    write_loop_round
from pipeline.core.runs import RunDir
from pipeline.core.yields import COMPARE_HEADERS, compare_rows, yield_table
from pipeline.curate import curate as curate_fn

from flows.common import locked, md_table, publish_markdown, run_links, with_run_name
from flows.e2e import kd3_pipeline
from flows.stages import curate as curate_flow

log = logging.getLogger("kd3.loop")


# ====================================================================== the steps (plain functions)

@dataclass
class Stages:
    """How a round runs each stage: plainly (:data:`PLAIN`) or as Prefect tasks/subflows (the flow)."""

    crawl_class: Callable[[RunConfig, str, list[PlannedQuery], int], dict]
    curate: Callable[[RunConfig], object]
    distill: Callable[[RunConfig, Optional[str], Optional[Path]], dict]


def _plain_distill(cfg: RunConfig, out_id: Optional[str], init_from: Optional[Path]) -> dict:
    return distill_fn(cfg, out_id=out_id, resume=True, init_from=init_from)


PLAIN = Stages(crawl_planned, curate_fn, _plain_distill)


def measure(cfg: RunConfig, method_dir: Path) -> YieldTable:
    """The yield table of one distill run, with this config's starvation line."""
    lc = cfg.loop
    return yield_table(cfg.run_dir, method_dir, cfg.resolved_classes(), last_epochs=lc.last_epochs,
                       min_selected=lc.min_selected, starved_fraction=lc.starved_fraction)


def round_config(cfg: RunConfig) -> RunConfig:
    """The config a loop round distills with (``loop.epochs_per_round``)."""
    if cfg.loop.epochs_per_round is None:
        return cfg
    d = cfg.model_dump()
    d["distill"]["epochs"] = cfg.loop.epochs_per_round
    return RunConfig.model_validate(d)


def round_out_id(cfg: RunConfig, r: int) -> Optional[str]:
    """Round 0 distills into the pipeline's own folder; round r into ``<method>-<id>-loopRR``."""
    if r == 0:
        return None
    return f"{default_out_id(round_config(cfg), Path(cfg.teacher))}-loop{r:02d}"


def _downloads(cfg: RunConfig) -> dict[str, int]:
    have = downloads_per_class(RunDir(cfg.run_dir).records)
    return {c: have.get(c, 0) for c in cfg.resolved_classes()}


def _kept(cfg: RunConfig) -> dict[str, int]:
    rd = RunDir(cfg.run_dir)
    out = {c: 0 for c in cfg.resolved_classes()}
    for d in read_decisions(rd.decisions) if rd.decisions.exists() else []:
        if d.kept and d.cls in out:
            out[d.cls] += 1
    return out


def start_round(cfg: RunConfig, r: int, before: YieldTable) -> LoopRound:
    """Round ``r``'s plan from the yield of the last distill run (written as ``started``)."""
    starved = before.starved
    shares = split_budget(cfg.loop.budget_per_round, starved)
    have = _downloads(cfg)
    rnd = LoopRound(round=r, before=before, downloaded_before=have)
    for c in starved:
        plan = plan_class(cfg.crawl, cfg.loop, c, before.classes[c].queries, shares[c])
        rnd.plan[c] = [p.to_row() for p in plan]
        rnd.targets[c] = have[c] + shares[c]
    rnd.added = {"kept_before": _kept(cfg)}
    write_loop_round(RunDir(cfg.run_dir).loop, rnd)
    log.info("loop round %d: starved %s (selected below %.1f); budget %s", r, starved or "none",
             before.min_selected, shares)
    return rnd


def crawl_round(cfg: RunConfig, rnd: LoopRound, stages: Stages = PLAIN) -> None:
    for c, rows in rnd.plan.items():
        stages.crawl_class(cfg, c, [PlannedQuery.from_row(p) for p in rows], rnd.targets[c])
    rnd.status = "crawled"
    write_loop_round(RunDir(cfg.run_dir).loop, rnd)


def curate_round(cfg: RunConfig, rnd: LoopRound, stages: Stages = PLAIN) -> None:
    stages.curate(cfg)
    kept, have, kept0 = _kept(cfg), _downloads(cfg), rnd.added.get("kept_before", {})
    rnd.added = {"kept_before": kept0, **{c: {"downloaded": have[c] - rnd.downloaded_before.get(c, 0),
                                              "kept": kept[c] - kept0.get(c, 0)} for c in kept}}
    rnd.status = "curated"
    write_loop_round(RunDir(cfg.run_dir).loop, rnd)


def new_kept(rnd: LoopRound) -> int:
    return sum(v.get("kept", 0) for k, v in rnd.added.items() if k != "kept_before")


def distill_round(cfg: RunConfig, rnd: LoopRound, prev_dir: Path, stages: Stages = PLAIN) -> None:
    """Distill on the grown pool (unless the round added too little), measure, decide whether to stop."""
    rd = RunDir(cfg.run_dir)
    if new_kept(rnd) < cfg.loop.min_new:
        rnd.after, rnd.distill_dir = rnd.before, str(prev_dir)
        rnd.stop = f"round {rnd.round} added {new_kept(rnd)} kept images (< loop.min_new {cfg.loop.min_new})"
    else:
        rcfg = round_config(cfg)
        out_id = round_out_id(cfg, rnd.round)
        init = prev_dir / "checkpoint.pt" if cfg.loop.distill == "continue" else None
        res = stages.distill(rcfg, out_id, init)
        rnd.distill_dir = str(Path(res.get("out_dir") or output_dir(rcfg, out_id)))
        rnd.after = measure(cfg, Path(rnd.distill_dir))
        if not rnd.after.starved:
            rnd.stop = "no class is starved"
    rnd.status = "done"
    write_loop_round(rd.loop, rnd)


def first_round(cfg: RunConfig, method_dir: Path) -> LoopRound:
    """Round 0: the pipeline's own distill run, measured."""
    rnd = LoopRound(round=0, status="done", distill_dir=str(method_dir), after=measure(cfg, method_dir),
                    downloaded_before={})
    if not rnd.after.starved:
        rnd.stop = "no class is starved"
    write_loop_round(RunDir(cfg.run_dir).loop, rnd)
    return rnd


def advance(cfg: RunConfig, rnd: LoopRound, stages: Stages = PLAIN) -> LoopRound:
    """Take round ``rnd`` (any status but done) to done."""
    prev_dir = Path(rnd.before.method_dir) if rnd.before else output_dir(cfg)
    if rnd.status == "started":
        crawl_round(cfg, rnd, stages)
    if rnd.status == "crawled":
        curate_round(cfg, rnd, stages)
    if rnd.status == "curated":
        distill_round(cfg, rnd, prev_dir, stages)
    return rnd


def next_round(cfg: RunConfig, rounds: list[LoopRound]) -> Optional[LoopRound]:
    """The round to work on now (an unfinished one, or a new one), or None when the loop is over."""
    last = rounds[-1]
    if last.status != "done":
        return last
    if last.stop or last.round >= cfg.loop.rounds:
        return None
    return start_round(cfg, last.round + 1, last.after)


def check_loop(cfg: RunConfig) -> None:
    if cfg.teacher is None:
        raise ConfigError("the loop distills: set `teacher` (or --teacher / --set teacher=PATH)")
    engines = query_sources()
    if not any(s in engines for s in cfg.crawl.sources):
        raise ConfigError(f"the loop asks search engines for more: crawl.sources needs {', '.join(engines)}")


def run_loop(cfg: RunConfig, stages: Stages = PLAIN, first: Optional[Callable[[RunConfig], Path]] = None,
             run_round: Optional[Callable[[RunConfig, LoopRound], LoopRound]] = None,
             on_done: Optional[Callable[[RunConfig, LoopRound], object]] = None) -> list[LoopRound]:
    """The whole loop; resumes from ``loop/``. ``first`` runs round 0 (default: crawl, curate and distill
    plainly) and returns its distill folder; ``run_round`` takes a round to done (default: :func:`advance`
    with ``stages``; the flow runs a subflow); ``on_done`` sees each round this call finished."""
    check_loop(cfg)
    save_resolved(cfg)
    rd = RunDir(cfg.run_dir)
    if not read_loop_rounds(rd.loop):
        rnd = first_round(cfg, (first or _plain_pipeline)(cfg))
        if on_done is not None:
            on_done(cfg, rnd)
    while True:
        rnd = next_round(cfg, read_loop_rounds(rd.loop))
        if rnd is None:
            return read_loop_rounds(rd.loop)
        rnd = (run_round or (lambda c, r: advance(c, r, stages)))(cfg, rnd)
        if on_done is not None:
            on_done(cfg, rnd)


def _plain_pipeline(cfg: RunConfig) -> Path:
    crawl_fn(cfg)
    curate_fn(cfg)
    return Path(distill_fn(cfg, resume=True).get("out_dir") or output_dir(cfg))


# ====================================================================== Prefect

def round_markdown(cfg: RunConfig, rnd: LoopRound) -> str:
    parts = [f"# kd3 loop — `{cfg.name}`, round {rnd.round}"]
    if rnd.before is not None and not rnd.before.selects:
        parts.append(f"method {rnd.before.method} trains on every image: starvation is read from kept counts")
    if rnd.plan:
        plan_rows = [[c, p["query"], p["source"], p["quota"], p.get("why", "")] for c, ps in rnd.plan.items()
                     for p in ps if p["quota"]]
        parts.append("## Plan\n\n" + md_table(["class", "query", "source", "quota", "why"], plan_rows))
    parts.append("## Per class, before -> after\n\n" + md_table(COMPARE_HEADERS, compare_rows(rnd.before, rnd.after)))
    if rnd.stop:
        parts.append(f"Loop stops: {rnd.stop}")
    parts.append(run_links(cfg))
    return "\n\n".join(parts)


@task(name="loop-crawl-class", task_run_name="loop-crawl-{name}")
def _crawl_class_task(cfg: RunConfig, name: str, plan: list[PlannedQuery], target: int) -> dict:
    return crawl_planned(cfg, name, plan, target)


@task(name="loop-distill")
def _distill_task(cfg: RunConfig, out_id: Optional[str], init_from: Optional[Path]) -> dict:
    res = distill_fn(cfg, out_id=out_id, resume=True, init_from=init_from)
    return {"out_dir": str(output_dir(cfg, out_id)), "final": res.get("final")}


def _flow_stages() -> Stages:
    return Stages(_crawl_class_task, curate_flow, _distill_task)  # curate: the cached subflow (key: the records)


@flow(name="kd3-loop-round", log_prints=True)
def loop_round(config: RunConfig, round_no: int) -> dict:
    """One round of the loop (started by the parent flow): crawl more for the starved classes, curate,
    distill, measure."""
    cfg = config
    rnd = next(r for r in read_loop_rounds(RunDir(cfg.run_dir).loop) if r.round == round_no)
    return advance(cfg, rnd, _flow_stages()).to_row()


def _publish_round(cfg: RunConfig, rnd: LoopRound) -> None:
    publish_markdown(f"loop-round-{rnd.round}", cfg, round_markdown(cfg, rnd), f"loop round {rnd.round} of {cfg.name}")


def _flow_first(cfg: RunConfig) -> Path:
    """Round 0 in the flow: the (cached) end-to-end pipeline, its distill folder."""
    res = kd3_pipeline(cfg)
    return Path(res["distill"].get("out_dir") or output_dir(cfg))


@flow(name="kd3-loop", log_prints=True)
def kd3_loop(config: RunConfig, run_name: Optional[str] = None) -> list[dict]:
    """The end-to-end pipeline, then up to ``loop.rounds`` rounds of crawl -> curate -> distill driven by
    what distillation selected; resumes from ``loop/``."""
    cfg = with_run_name(config, run_name)
    with locked(cfg):
        rounds = run_loop(cfg, first=_flow_first, on_done=_publish_round,
                          run_round=lambda c, r: LoopRound.from_row(loop_round(c, r.round)))
    return [r.to_row() for r in rounds]
