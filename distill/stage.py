"""The distill stage: ``distill(cfg)`` for flows and tests (``distill.launch`` runs it on several ranks).

Light to import (torch loads when a run starts); the training itself is :class:`distill.trainer.Trainer`."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

from pipeline.core.errors import ConfigError, DataError
from pipeline.core.preflight import check_distill_inputs
from pipeline.core.runs import RunDir
from pipeline.core.slug import slugify


log = logging.getLogger("kd3.distill")


def default_out_id(cfg, teacher_path: Path) -> str:
    """A hash of the distill config (less machine settings) and the teacher path."""
    d = cfg.public_dict()["distill"]
    for machine_only in ("workers", "device", "log_every"):  # how it runs, not what it computes
        d.pop(machine_only, None)
    if d.get("lr_schedule") == "step":  # the default keeps the ids runs had before the option existed
        d.pop("lr_schedule")
    h = hashlib.sha256(json.dumps({"d": d, "teacher": str(Path(teacher_path).resolve())}, sort_keys=True,
                                  default=str).encode()).hexdigest()
    return h[:8]


def reads(cfg) -> dict[str, Optional[Path]]:
    """Every file and folder a distill run reads besides its config (the flows' cache key fingerprints each:
    a folder by its tree, a file by its bytes)."""
    d = cfg.distill
    return {"manifest": RunDir(cfg.run_dir).manifest, "teacher": cfg.teacher, "eval_dir": d.eval_dir,
            "anchor_dir": d.anchor_dir, "keys_file": d.keys_file}


def output_dir(cfg, out_id: str | None = None) -> Path:
    if cfg.teacher is None:
        raise ConfigError("distill needs a teacher: set `teacher` (or --teacher / --set teacher=PATH)")
    oid = out_id or default_out_id(cfg, Path(cfg.teacher))
    if slugify(str(oid)) != str(oid):
        raise ConfigError(f"--out-id {oid!r} must be a plain folder name (letters, digits, -, _)")
    return RunDir(cfg.run_dir).distill / f"{cfg.distill.method}-{oid}"


def distill(cfg, *, out_id: str | None = None, resume: bool = False, manifest: str | Path | None = None,
            on_epoch_end: Optional[Callable[[int], None]] = None, init_from: str | Path | None = None) -> dict:
    """Distill a student on the run's shards; writes ``distill/<method>-<id>/``; returns metrics.

    A finished output folder is returned as is; an unfinished one needs ``resume=True``. ``init_from``: a
    ``checkpoint.pt`` of an earlier run of the same method and student to start from (the pool may have grown).
    """
    rd = RunDir(cfg.run_dir)
    mp = Path(manifest) if manifest is not None else rd.manifest
    if not mp.is_file():
        raise DataError(f"manifest {mp} is missing: run `kd3 curate` on {rd.root} first")
    check_distill_inputs(cfg, mp)  # teacher, eval_dir, classes, shards: before any folder is made
    teacher = Path(cfg.teacher)
    out = output_dir(cfg, out_id)
    from .trainer import run_training  # heavy (torch): the CLI and the flows import this module at start

    if init_from is not None and not Path(init_from).is_file():
        raise DataError(f"init_from checkpoint {init_from} does not exist")
    return run_training(cfg, mp, teacher, out, resume=resume, on_epoch_end=on_epoch_end, init_from=init_from)


def summary_line(metrics: dict) -> str:
    """``kd3 distill: kd3 cnn_mini → top-1 87.0% (eval_dir), teacher 96.9%, agreement 88.1%, 192k params,
    512 img/s`` (without ``eval_dir`` the top-1 is the agreement with the teacher on the held-out web slice)."""
    f = metrics.get("final") or {}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    params = f.get("params")
    size = "-" if params is None else (f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.0f}k")
    what = "top-1" if f.get("eval") == "eval_dir" else "top-1 agreement with the teacher"
    parts = [f"kd3 distill: {metrics.get('method')} {metrics.get('student')} → {what} {pct(f.get('top1'))} "
             f"({f.get('eval', '-')})"]
    if f.get("teacher_top1") is not None:
        parts.append(f"teacher {pct(f['teacher_top1'])}")
    if f.get("eval") == "eval_dir":
        parts.append(f"agreement {pct(f.get('agreement'))}")
    parts += [f"{size} params", f"{f.get('throughput_img_s') or 0:.0f} img/s"]
    return ", ".join(parts)
