"""Multi-GPU distillation: ``flow.gpus > 1`` runs ``torchrun --standalone --nproc-per-node N -m distill.launch``.

``launch(cfg, out_dir)`` (the flow's side) writes the resolved config (absolute paths, secrets removed:
distill needs none) and waits for the ranks; each rank runs :func:`main`, which is ``distill`` on that
config with ``--resume`` (the trainer reads WORLD_SIZE/LOCAL_RANK; rank 0 writes the outputs).

    python -m distill.launch --config runs/x/.prefect/distill-config.yaml --out-id ID [--resume]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.core.config import RunConfig, absolute_config, dump_config, load_config
from pipeline.core.errors import Kd3Error, report
from pipeline.core.logs import setup_logging
from pipeline.core.io import atomic_write_text
from pipeline.core.records import read_metrics

from .stage import distill

log = logging.getLogger("kd3.distill")


def launch(cfg: RunConfig, out_dir: Path) -> dict:
    """Run ``cfg.flow.gpus`` ranks under torchrun into ``out_dir``; returns its metrics."""
    cfg_path = (Path(cfg.run_dir) / ".prefect" / "distill-config.yaml").resolve()
    atomic_write_text(cfg_path, dump_config(absolute_config(cfg)))
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", f"--nproc-per-node={cfg.flow.gpus}", "-m", "distill.launch",
           "--config", str(cfg_path), "--out-id", out_dir.name.split("-", 1)[1], "--resume"]
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        proc.wait()
    finally:  # a cancelled/crashed flow must not leave the ranks running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun distill exited with code {proc.returncode} (see {out_dir}/train.log)")
    return read_metrics(out_dir / "metrics.json")


def main(argv: list[str] | None = None) -> int:
    """One rank: ``distill`` on a resolved config file."""
    p = argparse.ArgumentParser(prog="python -m distill.launch", description=main.__doc__)
    p.add_argument("--config", type=Path, required=True, help="resolved run config (YAML)")
    p.add_argument("--out-id", help="output folder distill/<method>-<id>")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    args = p.parse_args(argv)
    setup_logging("INFO")
    try:
        distill(load_config(args.config), out_id=args.out_id, resume=args.resume)
    except Kd3Error as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
