"""One Prefect flow per stage: ``kd3-crawl``, ``kd3-curate``, ``kd3-distill``.

The flows are thin: the work lives in the plain stage functions (``crawlers.stage``,
``pipeline.curate``, ``distill.stage``) which tests and the CLI also call directly. What the flows
add: a task per class for the crawl (bounded concurrency, retries with delay, any task runner),
cross-run caching keyed on inputs + code, and a summary artifact per stage. Task inputs are the run
config and strings (class names, paths); images never pass through Prefect.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from prefect import flow, task
from prefect.futures import as_completed

from pipeline.config import RunConfig, dump_config, save_resolved
from pipeline.errors import DataError, Kd3Error
from pipeline.io import atomic_write_text, read_json
from pipeline.runs import RunDir

from flows.common import (
    file_fingerprint,
    make_cache_key_fn,
    md_table,
    publish_markdown,
    result_storage,
    run_links,
    section_json,
    task_runner_for,
    tree_fingerprint,
    with_run_name,
)

log = logging.getLogger("kd3.flows")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _no_retry_on_user_error(task_, task_run, state) -> bool:
    """Retry network trouble, not a user mistake (a Kd3Error names something the user must fix)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001
        return True
    return not isinstance(exc, Kd3Error)


def _cached(state) -> bool:
    return state.name == "Cached"


def _configured(task_, cfg: RunConfig, *, refresh: bool, **extra):
    """Bind a task to this run's result store; ``refresh`` ignores (and replaces) a cached result."""
    return task_.with_options(
        result_storage=result_storage(cfg),
        persist_result=True,
        refresh_cache=refresh or not cfg.flow.cache,
        **extra,
    )


# ====================================================================== crawl

def _crawl_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    c = cfg.crawl
    return {
        "crawl": section_json(cfg, "crawl"),
        "class": inputs["class_name"],
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "folder": tree_fingerprint(c.folder) if "folder" in c.sources else None,
        "url_list": file_fingerprint(c.url_list) if "urls" in c.sources else None,
    }


@task(name="crawl-class", cache_key_fn=make_cache_key_fn(_crawl_key_parts, ("crawlers",)),
      result_serializer="json", retry_condition_fn=_no_retry_on_user_error)
def crawl_class_task(config: RunConfig, class_name: str) -> dict:
    """Crawl one class to ``crawl.per_class`` images; a class already at target is not crawled again."""
    from crawlers.stage import class_done, crawl_class

    if class_done(config, class_name):
        log.info("class %r is already crawled to target; skipped", class_name)
        return {"class": class_name, "skipped": True}
    summary = crawl_class(config, class_name)
    # a class short of its target is crawled again on the next run (the flow refreshes its cache entry)
    return {"class": class_name, "skipped": False, "summary": _jsonable(summary)}


def _read_crawl_summary(cfg: RunConfig) -> dict:
    """crawl/summary.json, which every ``crawl_class`` merges its class into (under a lock)."""
    p = RunDir(cfg.run_dir).crawl_summary
    return read_json(p) if p.is_file() else {}


@flow(name="kd3-crawl-classes", log_prints=True)
def _crawl_classes(config: RunConfig, force: bool = False) -> dict:
    from crawlers.stage import class_done

    cfg = config
    classes = cfg.resolved_classes()
    limit = cfg.flow.crawl_concurrency
    pending = list(classes)
    running: list = []
    states: dict[str, Any] = {}
    owner: dict[int, str] = {}
    while pending or running:
        while pending and len(running) < limit:
            name = pending.pop(0)
            t = _configured(crawl_class_task, cfg, refresh=force or not class_done(cfg, name),
                            retries=cfg.flow.crawl_retries,
                            retry_delay_seconds=cfg.flow.crawl_retry_delay_s)
            fut = t.submit(cfg, name)
            owner[id(fut)] = name
            running.append(fut)
        done = next(as_completed(running))
        running.remove(done)
        done.wait()  # sets the future's final state locally (the API's copy may lag)
        states[owner[id(done)]] = done.state
    failed = {n: s for n, s in states.items() if s.is_failed() or s.is_crashed()}
    if failed:
        first = next(iter(failed.values()))
        exc = first.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"crawl failed for classes {sorted(failed)}")
    summary = _read_crawl_summary(cfg)
    return {"classes": {n: ("cached" if _cached(s) else "crawled") for n, s in states.items()},
            "summary": summary}


def _crawl_artifact(cfg: RunConfig, result: dict) -> None:
    summary = result.get("summary") or {}
    per_class = summary.get("classes") or summary.get("per_class") or {}
    rows = []
    for name, how in result["classes"].items():
        s = per_class.get(name, {}) if isinstance(per_class, dict) else {}
        failed = s.get("failed") or {}
        rows.append([name, how, s.get("target", "-"), s.get("downloaded", "-"), s.get("duplicates", "-"),
                     ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "-"])
    md = "\n\n".join([
        f"# kd3 crawl — `{cfg.name}`",
        f"ok: **{summary.get('ok', '?')}**, classes: {len(rows)}, "
        f"cached: {sum(1 for r in rows if r[1] == 'cached')}",
        md_table(["class", "this run", "target", "downloaded", "duplicates", "failed by reason"], rows),
        run_links(cfg),
    ])
    publish_markdown("crawl", cfg, md, f"crawl summary of run {cfg.name}")


@flow(name="kd3-crawl", log_prints=True)
def crawl(config: RunConfig, run_name: Optional[str] = None, force: bool = False) -> dict:
    """Crawl every class: one task per class on ``flow.task_runner`` (thread pool or Dask)."""
    cfg = with_run_name(config, run_name)
    save_resolved(cfg)
    runner = task_runner_for(cfg, cfg.flow.crawl_concurrency)
    result = _crawl_classes.with_options(task_runner=runner)(cfg, force=force)
    _crawl_artifact(cfg, result)
    return result


# ====================================================================== curate

def _curate_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    rd = RunDir(cfg.run_dir)
    cur = cfg.curate
    return {
        "curate": section_json(cfg, "curate"),
        "classes": cfg.resolved_classes(),
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "records": file_fingerprint(rd.records),
        "folder": tree_fingerprint(cfg.crawl.folder) if "folder" in cfg.crawl.sources else None,
        "teacher": file_fingerprint(cfg.teacher),
        "clip_weights": file_fingerprint(cur.clip_weights),
        "decontaminate": tree_fingerprint(cur.decontaminate),
    }


@task(name="curate", cache_key_fn=make_cache_key_fn(_curate_key_parts, ("pipeline",)),
      result_serializer="json")
def curate_task(config: RunConfig) -> dict:
    """Validate, dedup, embed, index, decontaminate and shard; returns a small manifest summary."""
    from pipeline.curate import curate as curate_fn

    manifest = curate_fn(config)
    rd = RunDir(config.run_dir)
    return {
        "manifest": str(rd.manifest.resolve()),
        "manifest_sha256": file_fingerprint(rd.manifest),
        "nsamples": manifest.get("nsamples"),
        "class_counts": manifest.get("class_counts", {}),
        "stats": manifest.get("stats", {}),
        "shards": len(manifest.get("shardlist", [])),
        "embedding": manifest.get("embedding", {}),
    }


def _curate_outputs_ok(result: dict) -> bool:
    return bool(result) and file_fingerprint(result.get("manifest")) == result.get("manifest_sha256")


def _curate_artifact(cfg: RunConfig, result: dict, cached: bool) -> None:
    dropped: dict[str, int] = {}
    step_rows = []
    for step, st in (result.get("stats") or {}).items():
        d = st.get("dropped", {}) if isinstance(st, dict) else {}
        for reason, n in d.items():
            dropped[reason] = dropped.get(reason, 0) + int(n)
        step_rows.append([step, st.get("in", "-"), st.get("out", "-")] if isinstance(st, dict) else [step, "-", "-"])
    md = "\n\n".join([
        f"# kd3 curate — `{cfg.name}`" + (" (cached)" if cached else ""),
        f"kept samples: **{result.get('nsamples')}** in {result.get('shards')} shard(s); "
        f"manifest `{result.get('manifest')}`",
        "## Kept per class\n\n" + md_table(["class", "kept"], sorted((result.get("class_counts") or {}).items())),
        "## Drops by reason\n\n" + (md_table(["reason", "dropped"], sorted(dropped.items())) if dropped else "none"),
        "## Steps\n\n" + (md_table(["step", "in", "out"], step_rows) if step_rows else "-"),
        run_links(cfg),
    ])
    publish_markdown("curate", cfg, md, f"curation summary of run {cfg.name}")


def _run_coarse(task, cfg: RunConfig, force: bool, outputs_ok, artifact, stale_msg: str) -> dict:
    """Run a coarse cached stage task; a cache hit whose outputs are gone runs again."""
    state = _configured(task, cfg, refresh=force)(cfg, return_state=True)
    result = state.result()
    if _cached(state) and not outputs_ok(result):
        log.warning(stale_msg)
        state = _configured(task, cfg, refresh=True)(cfg, return_state=True)
        result = state.result()
    artifact(cfg, result, _cached(state))
    return dict(result, cached=_cached(state))


@flow(name="kd3-curate", log_prints=True)
def curate(config: RunConfig, run_name: Optional[str] = None, force: bool = False) -> dict:
    """Curate the crawl of this run into shards + manifest (one coarse, cached task)."""
    cfg = with_run_name(config, run_name)
    return _run_coarse(curate_task, cfg, force, _curate_outputs_ok, _curate_artifact,
                       "cached curate result points at a missing or changed manifest; curating again")


# ====================================================================== distill

def _distill_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    rd = RunDir(cfg.run_dir)
    return {
        "distill": section_json(cfg, "distill"),
        "gpus": cfg.flow.gpus,
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "manifest": file_fingerprint(rd.manifest),
        "teacher": file_fingerprint(cfg.teacher),
        "eval_dir": tree_fingerprint(cfg.distill.eval_dir),
    }


def _torchrun_distill(cfg: RunConfig, out_dir: Path) -> dict:
    """``flow.gpus > 1``: ``torchrun --standalone --nproc-per-node <gpus> -m pipeline.cli distill ...``.

    The trainer reads WORLD_SIZE/LOCAL_RANK (DDP); rank 0 writes ``<out_dir>/metrics.json``.
    """
    from flows.cli import absolute_config

    cfg_path = (Path(cfg.run_dir) / ".prefect" / "distill-config.yaml").resolve()
    atomic_write_text(cfg_path, dump_config(absolute_config(cfg)))  # secrets removed: distill needs none
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", f"--nproc-per-node={cfg.flow.gpus}", "-m", "pipeline.cli", "distill",
           "--config", str(cfg_path), "--out-id", out_dir.name.split("-", 1)[1], "--resume"]
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        proc.wait()
    finally:  # a cancelled/crashed flow must not leave the ranks running
        if proc.poll() is None:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun distill exited with code {proc.returncode} (see {out_dir}/train.log)")
    return read_json(out_dir / "metrics.json")


@task(name="distill", cache_key_fn=make_cache_key_fn(_distill_key_parts, ("distill", "pipeline")),
      result_serializer="json")
def distill_task(config: RunConfig) -> dict:
    """Distill the student (in-process on one device, torchrun for ``flow.gpus > 1``).

    An unfinished output folder (a crash mid-training) is resumed from its last epoch checkpoint.
    """
    from distill.stage import distill as distill_fn
    from distill.stage import output_dir

    RunDir(config.run_dir).require(RunDir(config.run_dir).manifest, "curate")
    out_dir = output_dir(config)
    if config.flow.gpus > 1:
        metrics = _torchrun_distill(config, out_dir)
    else:
        metrics = distill_fn(config, resume=True)
    return dict(_jsonable(metrics), out_dir=str(out_dir.resolve()))


def _student_of(result: dict) -> Optional[Path]:
    out = result.get("out_dir")
    return Path(out) / "student.pt" if out else None


def _distill_outputs_ok(result: dict) -> bool:
    s = _student_of(result or {})
    return s is not None and s.is_file()


def _distill_artifact(cfg: RunConfig, result: dict, cached: bool) -> None:
    final = result.get("final") or {}
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in final.items()]
    md = "\n\n".join([
        f"# kd3 distill — `{cfg.name}`" + (" (cached)" if cached else ""),
        f"method **{result.get('method', cfg.distill.method)}**, student **{result.get('student', cfg.distill.student)}**; "
        f"output `{result.get('out_dir')}`",
        md_table(["metric", "value"], rows) if rows else "no final metrics",
        run_links(cfg),
    ])
    publish_markdown("distill", cfg, md, f"distillation result of run {cfg.name}")


@flow(name="kd3-distill", log_prints=True)
def distill(config: RunConfig, run_name: Optional[str] = None, force: bool = False) -> dict:
    """Distill a student on this run's manifest (one coarse, cached task)."""
    cfg = with_run_name(config, run_name)
    return _run_coarse(distill_task, cfg, force, _distill_outputs_ok, _distill_artifact,
                       "cached distill result points at a missing student; distilling again")


STAGE_FLOWS = {"crawl": crawl, "curate": curate, "distill": distill}
