"""Shared pieces of the kd3 Prefect flows: cache keys, result stores, task runners, artifacts.

Cache keys are computed from what a stage reads (its config section, fingerprints of its input
files, the run directory it writes) and from the code that does the work (the task's source and
the stage package's sources), never from the flow run id. Results (small JSON summaries, never
images) and cache records live under ``runs/<name>/.prefect/`` unless ``flow.result_store`` names
another folder.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.core.config import RunConfig
from pipeline.core.io import sha256_file
from pipeline.core.runlock import run_lock

log = logging.getLogger("kd3.flows")

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fingerprints

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: Optional[str | os.PathLike]) -> Optional[str]:
    """sha256 of a file's bytes; ``None`` for no path, ``"missing"`` for a path that is not there."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return "missing"
    return sha256_file(p)


def tree_fingerprint(root: Optional[str | os.PathLike]) -> Optional[str]:
    """Cheap fingerprint of a folder tree: relative names, sizes and mtimes of every file."""
    if root is None:
        return None
    r = Path(root)
    if not r.is_dir():
        return "missing"
    rows = []
    for dirpath, dirnames, filenames in os.walk(r):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except OSError:
                continue
            rows.append((str(p.relative_to(r)), st.st_size, st.st_mtime_ns))
    return _sha(rows)


def fingerprints(reads: dict) -> dict:
    """What a stage declares it reads, fingerprinted: a folder by its tree, a file by its bytes."""
    return {k: tree_fingerprint(p) if p is not None and Path(p).is_dir() else file_fingerprint(p)
            for k, p in reads.items()}


@lru_cache(maxsize=None)
def code_fingerprint(*packages: str) -> str:
    """sha256 over the ``*.py`` sources of the named package folders (``crawlers``, ``pipeline/core``, ...)."""
    h = hashlib.sha256()
    for pkg in packages:
        base = REPO_ROOT / pkg
        for p in sorted(base.rglob("*.py")):
            h.update(str(p.relative_to(REPO_ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def section_json(cfg: RunConfig, section: str) -> dict:
    """A config section as JSON, secrets removed (they never change what a stage produces)."""
    return cfg.public_dict()[section]


def make_cache_key_fn(parts: Callable[[dict], dict], packages: tuple[str, ...]) -> Callable:
    """A Prefect ``cache_key_fn``: hash of ``parts(task inputs)`` + the task source + package sources.

    Prefect calls it as ``fn(task_run_context, inputs)``; the key never contains the flow run id.
    ``code_fingerprint`` is recomputed per process (lru_cache) — edits between runs change the key.
    """

    def key_fn(ctx, inputs: dict) -> str:
        try:
            task_src = inspect.getsource(ctx.task.fn)
        except (OSError, TypeError):
            task_src = ctx.task.fn.__qualname__
        key = _sha({
            "task": ctx.task.name,
            "task_source": hashlib.sha256(task_src.encode()).hexdigest(),
            "code": code_fingerprint(*packages),
            "inputs": parts(inputs),
        })
        return f"kd3-{ctx.task.name}-{key[:32]}"

    return key_fn


# ---------------------------------------------------------------- stores and runners

def result_store_path(cfg: RunConfig) -> Path:
    if cfg.flow.result_store is not None:
        return Path(cfg.flow.result_store).resolve()
    return (Path(cfg.run_dir) / ".prefect").resolve()


def result_storage(cfg: RunConfig) -> Path:
    """A folder: Prefect turns a ``Path`` into local file-system result storage (no saved block needed)."""
    path = result_store_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def task_runner_for(cfg: RunConfig, max_workers: int):
    """``flow.task_runner``: a thread pool of ``max_workers``, or Dask (LocalCluster or ``dask_address``)."""
    if cfg.flow.task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # heavy (dask): only for flow.task_runner dask

        if cfg.flow.dask_address:
            return DaskTaskRunner(address=cfg.flow.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": cfg.flow.dask_workers,
                "threads_per_worker": 1,
                "processes": cfg.flow.dask_processes,
                "dashboard_address": None,
            },
        )
    return ThreadPoolTaskRunner(max_workers=max_workers)


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` onto ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@lru_cache(maxsize=32)
def _registered_config(deployment_id: str) -> str:
    from prefect.client.orchestration import get_client  # only inside a deployment's run

    with get_client(sync_client=True) as client:
        params = client.read_deployment(deployment_id).parameters or {}
    return json.dumps(params.get("config") or {})


def deployment_config() -> dict:
    """Inside a run of a deployment: the config it was registered with (its default ``config``); else {}."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    dep = getattr(getattr(ctx, "flow_run", None), "deployment_id", None)
    return json.loads(_registered_config(str(dep))) if dep else {}


def with_run_name(config: RunConfig | dict, run_name: Optional[str]) -> RunConfig:
    """Flow parameters: the config (a pydantic model; a dict from the API) and an optional run name.

    In a deployment's run the given config is merged onto the deployment's own: Prefect replaces a
    parameter whole, so ``--params '{"config": {"distill": {"epochs": 3}}}'`` would otherwise run the
    defaults (run ``default`` under ``./runs``). Only the fields the caller set are laid over it."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    base = deployment_config()
    if base:
        cfg = RunConfig.model_validate(deep_merge(base, cfg.model_dump(exclude_unset=True)))
        cfg.check_teacher_classes("deployment parameters")
    if run_name:
        cfg = cfg.model_copy(update={"name": run_name})
        cfg = RunConfig.model_validate(cfg.model_dump())  # re-validate the name
    return cfg


# ---------------------------------------------------------------- one writer per run directory

def lock_holder() -> Optional[str]:
    """The id a flow run holds its run directory's lock under: ``flow run <name> (<id>)``."""
    from prefect.context import FlowRunContext

    fr = getattr(FlowRunContext.get(), "flow_run", None)
    return f"flow run {fr.name} ({fr.id})" if fr is not None else None


def locked(cfg: RunConfig, join: Optional[str] = None):
    """Inside a flow: hold ``runs/<name>/.lock`` (pipeline.core.runlock); a second run of the same config
    fails at once naming the first, a subflow of the holder enters it again. ``join``: the rendezvous id of
    a multi-node distill, whose other nodes may hold the lock already (and let this one in)."""
    return run_lock(cfg.run_dir, lock_holder(), join)


# ---------------------------------------------------------------- artifacts

def artifact_key(stage: str, cfg: RunConfig) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"kd3-{stage}-{cfg.name}".lower()).strip("-")


def publish_markdown(stage: str, cfg: RunConfig, markdown: str, description: str) -> None:
    try:
        create_markdown_artifact(markdown=markdown, key=artifact_key(stage, cfg), description=description)
    except Exception as e:  # an artifact must never fail a stage that succeeded
        log.warning("could not publish the %s artifact: %s", stage, e)


def md_table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    headers = list(headers)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out)


def run_links(cfg: RunConfig) -> str:
    run_dir = Path(cfg.run_dir).resolve()
    report = run_dir / "report" / "index.html"
    lines = [f"Run directory: [`{run_dir}`](file://{run_dir})"]
    if report.is_file():
        lines.append(f"Report: [`{report}`](file://{report})")
    else:
        lines.append(f"Report: `kd3 inspect {run_dir} --html` writes `{report}`")
    return "  \n".join(lines)
