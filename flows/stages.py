"""One Prefect flow per stage: ``kd3-crawl``, ``kd3-curate``, ``kd3-distill``.

The flows only orchestrate: the work, and the answer to "is this done?", live in the plain stage
functions (``crawlers.stage``, ``pipeline.curate``, ``distill.stage``) which tests and the CLI also call
directly. What the flows add: the crawl fanned out with ``task.map`` (one task run ``crawl-class-<class>``
per class, ``flow.crawl_concurrency`` at once on the task runner, retries with delay), cross-run caching
keyed on inputs + code, and a summary artifact per stage. Task inputs are the run
config and strings (class names, paths); images never pass through Prefect.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from crawlers.source import source_inputs
from crawlers.stage import check_found_images, crawl_class
from distill.launch import launch, rendezvous_id, several_ranks
from distill.stage import distill as distill_fn
from distill.stage import output_dir
from distill.stage import reads as distill_reads
from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.errors import Kd3Error
from pipeline.core.records import CrawlSummary, read_crawl_summary
from pipeline.core.runlock import allow_join
from pipeline.core.runs import RunDir
from pipeline.curate import curate as curate_fn
from pipeline.curate import run_chunk, worker_config
from pipeline.curate.scan import Chunk
from pipeline.curate.sources import reads as curate_reads

from flows.common import (
    file_fingerprint,
    fingerprints,
    locked,
    make_cache_key_fn,
    md_table,
    publish_markdown,
    result_storage,
    run_links,
    section_json,
    task_runner_for,
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

def source_fingerprints(cfg: RunConfig) -> dict:
    """The local files and folders the configured crawl sources read (each source names its own)."""
    return fingerprints(source_inputs(cfg))


def _crawl_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    c = cfg.crawl
    return {
        "crawl": section_json(cfg, "crawl"),
        "class": inputs["class_name"],
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "inputs": source_fingerprints(cfg),
    }


@task(name="crawl-class", task_run_name="crawl-class-{class_name}",
      cache_key_fn=make_cache_key_fn(_crawl_key_parts, ("crawlers", "pipeline/core")),
      result_serializer="json", retry_condition_fn=_no_retry_on_user_error)
def crawl_class_task(config: RunConfig, class_name: str) -> dict:
    """Crawl one class to ``crawl.per_class`` images (the stage skips a class that is there already)."""
    return _jsonable(crawl_class(config, class_name))


def _crawl_outputs_ok(cfg: RunConfig, result: dict) -> bool:
    """A cached class result stands while the stage said the class is done and its records exist;
    a class short of its target is crawled again on the next run."""
    return bool(result.get("done")) and RunDir(cfg.run_dir).records.is_file()


@flow(name="kd3-crawl-classes", log_prints=True)
def _crawl_classes(config: RunConfig, force: bool = False) -> dict:
    """One task per class, ``flow.crawl_concurrency`` at once (the task runner's ``max_workers``)."""
    cfg = config
    classes = cfg.resolved_classes()

    def run(names: list[str], refresh: bool) -> dict:
        t = _configured(crawl_class_task, cfg, refresh=refresh, retries=cfg.flow.crawl_retries,
                        retry_delay_seconds=cfg.flow.crawl_retry_delay_s)
        futures = t.map(unmapped(cfg), names)
        futures.wait()
        return {n: f.state for n, f in zip(names, futures)}

    states = run(classes, force)
    stale = [n for n, st in states.items() if _cached(st) and not _crawl_outputs_ok(cfg, st.result())]
    if stale:
        states.update(run(stale, True))
    failed = {n: s for n, s in states.items() if s.is_failed() or s.is_crashed()}
    if failed:
        exc = next(iter(failed.values())).result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"crawl failed for classes {sorted(failed)}")
    summary = read_crawl_summary(RunDir(cfg.run_dir).crawl_summary)
    if summary is not None:
        check_found_images(cfg, summary)
    return {"classes": {n: ("cached" if _cached(s) else "crawled") for n, s in states.items()},
            "summary": summary.to_row() if summary else {}}


def _crawl_artifact(cfg: RunConfig, result: dict) -> None:
    summary = CrawlSummary.from_row(result.get("summary") or {})
    rows = []
    for name, how in result["classes"].items():
        s = summary.classes.get(name)
        failed = s.failed if s else {}
        target = "-" if s is None else ("all" if s.target is None else s.target)
        rows.append([name, how, target, s.downloaded if s else "-", s.duplicates if s else "-",
                     ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "-"])
    md = "\n\n".join([
        f"# kd3 crawl — `{cfg.name}`",
        f"ok: **{summary.ok if result.get('summary') else '?'}**, classes: {len(rows)}, "
        f"cached: {sum(1 for r in rows if r[1] == 'cached')}",
        md_table(["class", "this run", "target", "downloaded", "duplicates", "failed by reason"], rows),
        run_links(cfg),
    ])
    publish_markdown("crawl", cfg, md, f"crawl summary of run {cfg.name}")


@flow(name="kd3-crawl", log_prints=True)
def crawl(config: RunConfig, run_name: Optional[str] = None, force: bool = False) -> dict:
    """Crawl every class: one task per class on ``flow.task_runner`` (thread pool or Dask)."""
    cfg = with_run_name(config, run_name)
    with locked(cfg):
        save_resolved(cfg)
        runner = task_runner_for(cfg, cfg.flow.crawl_concurrency)
        result = _crawl_classes.with_options(task_runner=runner)(cfg, force=force)
    _crawl_artifact(cfg, result)
    return result


# ====================================================================== curate

def _curate_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    return {
        "curate": section_json(cfg, "curate"),
        "classes": cfg.resolved_classes(),
        "run_dir": str(Path(cfg.run_dir).resolve()),
        **fingerprints(curate_reads(cfg)),  # what the stage declares it reads (pipeline.curate.sources.reads)
    }


@task(name="scan-chunk", task_run_name="scan-{chunk.kind}-{chunk.index}", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_condition_fn=_no_retry_on_user_error)
def scan_chunk_task(config: RunConfig, chunk: Chunk) -> dict:
    """Decode, hash and embed one chunk of the curate scan (or the planted copies of the near-dup
    calibration) into its own files under ``curate/cache/``; on a Dask worker, so the run directory must
    be on storage every worker sees at the same path."""
    return run_chunk(config, chunk)


@contextlib.contextmanager
def chunk_mapper(cfg: RunConfig) -> Iterator[Optional[Callable[[list[Chunk]], list[dict]]]]:
    """How the curate scan's chunks run: one ``scan-chunk`` task each on Dask (``flow.task_runner: dask``;
    the cluster is started at the first chunk, so a run with nothing to scan starts none, and stopped on
    the way out), else in the curate task's own process (None)."""
    if cfg.flow.task_runner != "dask":
        yield None
        return
    shipped = worker_config(cfg)
    with contextlib.ExitStack() as stack:
        runners: list = []

        def map_chunks(chunks: list[Chunk]) -> list[dict]:
            if not runners:
                log.info("curate: scan chunks on Dask (%s)",
                         cfg.flow.dask_address or f"a LocalCluster of {cfg.flow.dask_workers} workers")
                runners.append(stack.enter_context(task_runner_for(cfg, 1)))
            futures = runners[0].map(scan_chunk_task, {"config": unmapped(shipped), "chunk": chunks})
            futures.wait()
            states = [f.state for f in futures]
            for st in states:
                if not st.is_completed():
                    exc = st.result(raise_on_failure=False)
                    raise exc if isinstance(exc, BaseException) else RuntimeError(f"scan chunk failed: {st.name}")
            return [st.result() for st in states]

        yield map_chunks


@task(name="curate", cache_key_fn=make_cache_key_fn(_curate_key_parts, ("pipeline/core", "pipeline/curate")),
      result_serializer="json")
def curate_task(config: RunConfig) -> dict:
    """Validate, dedup, embed, index, decontaminate and shard; returns a small manifest summary. The scan
    runs as ``scan-chunk`` tasks on Dask when ``flow.task_runner`` is dask; the reduce runs here."""
    with chunk_mapper(config) as map_chunks:
        manifest = curate_fn(config, map_chunks=map_chunks)
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
    """Curate the crawl of this run into shards + manifest (one coarse, cached task; on Dask its scan fans
    out as one task per chunk)."""
    cfg = with_run_name(config, run_name)
    with locked(cfg):
        return _run_coarse(curate_task, cfg, force, _curate_outputs_ok, _curate_artifact,
                           "cached curate result points at a missing or changed manifest; curating again")


# ====================================================================== distill

def _distill_key_parts(inputs: dict) -> dict:
    cfg: RunConfig = with_run_name(inputs["config"], None)
    return {
        "distill": section_json(cfg, "distill"),
        "gpus": cfg.flow.gpus,
        "nodes": cfg.flow.nodes,
        "run_dir": str(Path(cfg.run_dir).resolve()),
        **fingerprints(distill_reads(cfg)),  # what the stage declares it reads (distill.stage.reads)
    }


@task(name="distill", cache_key_fn=make_cache_key_fn(_distill_key_parts, ("distill", "pipeline/core")),
      result_serializer="json")
def distill_task(config: RunConfig) -> dict:
    """Distill the student (in-process on one device, torchrun for ``flow.gpus > 1`` or ``flow.nodes > 1``).

    An unfinished output folder (a crash mid-training) is resumed from its last epoch checkpoint.
    """
    RunDir(config.run_dir).require(RunDir(config.run_dir).manifest, "curate")
    out_dir = output_dir(config)
    if several_ranks(config):
        if config.flow.nodes > 1:  # the other nodes' `kd3 distill --nnodes N --rdzv H:P` join the flow's lock
            allow_join(config.run_dir, rendezvous_id(config, out_dir))
        metrics = launch(config, out_dir)
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
    join = rendezvous_id(cfg, output_dir(cfg)) if cfg.flow.nodes > 1 else None  # the other nodes' id
    with locked(cfg, join):
        return _run_coarse(distill_task, cfg, force, _distill_outputs_ok, _distill_artifact,
                           "cached distill result points at a missing student; distilling again")


STAGE_FLOWS = {"crawl": crawl, "curate": curate, "distill": distill}
