"""Checks that need no work: run before a stage creates any folder, so a refused command writes nothing.

``preflight(cfg, stages)`` is what ``kd3 crawl|curate|distill|run`` call right after the config loads
(``kd3 run`` for all three stages, before Prefect starts); the stage functions call the part that is
theirs too (:func:`check_sources`, :func:`check_distill_inputs`), so flows and tests get the same checks.
What only the work can find (a shard whose sha256 is wrong, a pool with no image) is found by the stage,
which then removes what it had begun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from . import plugins
from .checkpoint import check_classes, read_checkpoint_meta
from .config import EMBEDDERS, SOURCES, RunConfig
from .errors import ConfigError, DataError

STAGES = ("crawl", "curate", "distill")


def check_sources(cfg: RunConfig) -> None:
    """Fail fast, naming the setting, when a listed crawl source cannot work (each source checks its own)."""
    for name in cfg.crawl.sources:
        plugins.implementation(SOURCES, name, "crawl source").check(cfg)


def check_teacher(cfg: RunConfig, why: str) -> dict:
    """The teacher is set and readable as a checkpoint; returns its metadata."""
    if cfg.teacher is None:
        raise ConfigError(f"{why} needs a teacher: set `teacher` (or --teacher / --set teacher=PATH)")
    if not Path(cfg.teacher).is_file():
        raise DataError(f"teacher checkpoint {cfg.teacher} does not exist")
    return read_checkpoint_meta(cfg.teacher)


def check_distill_inputs(cfg: RunConfig, manifest: Optional[Path] = None) -> None:
    """Teacher, eval_dir and (once curated) the manifest: classes equal the teacher's, every shard there."""
    meta = check_teacher(cfg, "distill")
    ev, an = cfg.distill.eval_dir, cfg.distill.anchor_dir
    if ev is not None and not Path(ev).is_dir():
        raise ConfigError(f"distill.eval_dir {ev} is not a folder")
    if an is not None and not Path(an).is_dir():
        raise ConfigError(f"distill.anchor_dir {an} is not a folder")
    if an is not None and ev is not None and Path(an).resolve() == Path(ev).resolve():
        raise ConfigError(f"distill.anchor_dir is distill.eval_dir ({ev}): the images selection learns from must "
                          f"not be the ones the student is measured on")
    if manifest is None or not Path(manifest).is_file():
        return
    from .records import read_manifest, shard_path  # records pulls numpy; only needed once a manifest exists

    man = read_manifest(manifest)
    check_classes(meta["classes"], man["classes"], f"teacher {Path(cfg.teacher).name}",
                  f"manifest {Path(manifest).name}")
    for s in man["shardlist"]:
        p = shard_path(manifest, s["url"])
        if p is None:
            continue  # remote shards: the trainer refuses them with its own message
        if not p.is_file():
            raise DataError(f"shard {s['url']} listed in {manifest} is missing ({p})")


def preflight(cfg: RunConfig, stages: Iterable[str], manifest: Optional[Path] = None) -> None:
    """Everything about ``stages`` that can be checked before any folder is created."""
    stages = set(stages)
    unknown = stages - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}: expected {', '.join(STAGES)}")
    if "crawl" in stages:
        cfg.resolved_classes()
        check_sources(cfg)
    if "curate" in stages:
        cur = cfg.curate
        plugins.implementation(EMBEDDERS, cur.embed_backend, "curate.embed_backend").check(cfg)
        if cur.decontaminate is not None and not Path(cur.decontaminate).is_dir():
            raise ConfigError(f"curate.decontaminate {cur.decontaminate} is not a folder")
    if "distill" in stages:
        check_distill_inputs(cfg, manifest)
