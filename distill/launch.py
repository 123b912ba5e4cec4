"""Distillation over several processes: ``flow.gpus > 1`` and/or ``flow.nodes > 1`` run torchrun.

One node: ``torchrun --standalone --nproc-per-node G -m distill.launch``. Several nodes (``flow.nodes N``,
``flow.rdzv HOST:PORT``; ``kd3 distill --nnodes N --rdzv HOST:PORT``): the same command on every node, each a
torchrun agent of a c10d rendezvous at HOST:PORT, identified by the run and output folder, so every node
lands in the same ``distill/<method>-<id>/`` (the run directory lives on shared storage). The global batch is
``distill.batch_size`` whatever the number of ranks.

``launch(cfg, out_dir)`` (the flow's and the CLI's side) writes the resolved config (absolute paths, secrets
removed: distill needs none), runs the agent and waits; each rank runs :func:`main`, which is ``distill`` on
that config (the trainer reads WORLD_SIZE/RANK; rank 0 writes the outputs). A rank that dies stops the
others (:mod:`distill.ranks`) and the launch ends in one line naming it; torchrun's own account goes to a
log file beside it.

    python -m distill.launch --config runs/x/.prefect/distill-config-HOST-PID.yaml --out-id ID [--resume]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.core.config import RunConfig, absolute_config, dump_config, load_config
from pipeline.core.errors import Kd3Error, report
from pipeline.core.io import atomic_write_text
from pipeline.core.logs import setup_logging
from pipeline.core.preflight import check_distill_inputs
from pipeline.core.records import read_metrics
from pipeline.core.runs import RunDir

from . import ranks
from .stage import distill, output_dir, summary_line

log = logging.getLogger("kd3.distill")

# torchrun's account of a failure (a traceback, the elastic agent's ChildFailedError table) starts here; the
# launch ends with its own one line instead, and the full account stays in the log file
_FAILURE_START = re.compile(r"Traceback \(most recent call last\)|ChildFailedError|^\s*\[rank\d+\]:.*Error|"
                            r"torch\.distributed\.elastic\.multiprocessing\.api:\[(WARNING|ERROR)\]")


class RankFailed(Kd3Error):
    """A rank of a multi-process distill died or failed; the others stopped."""

    exit_code = 1


def rendezvous_id(cfg: RunConfig, out_dir: Path) -> str:
    """What every node of one multi-node distill agrees on without talking: the run and the output folder."""
    return f"kd3-{cfg.name}-{Path(out_dir).name}"


def torchrun_command(cfg: RunConfig, cfg_path: Path, out_dir: Path, resume: bool = True) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    launcher = [torchrun] if Path(torchrun).exists() else [sys.executable, "-m", "torch.distributed.run"]
    fl = cfg.flow
    if fl.nodes > 1:
        where = [f"--nnodes={fl.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={fl.rdzv}",
                 f"--rdzv-id={rendezvous_id(cfg, out_dir)}", "--max-restarts=0"]
    else:
        where = ["--standalone"]
    return [*launcher, *where, f"--nproc-per-node={max(1, fl.gpus)}", "-m", "distill.launch",
            "--config", str(cfg_path), "--out-id", out_dir.name.split("-", 1)[1], *(["--resume"] if resume else [])]


def launch(cfg: RunConfig, out_dir: Path, resume: bool = True) -> dict:
    """Run this node's ``cfg.flow.gpus`` ranks under torchrun into ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    check_distill_inputs(cfg, RunDir(cfg.run_dir).manifest)  # one line here, not one per rank
    node = f"{socket.gethostname()}-{os.getpid()}"
    cfg_path = (Path(cfg.run_dir) / ".prefect" / f"distill-config-{node}.yaml").resolve()
    atomic_write_text(cfg_path, dump_config(absolute_config(cfg)))
    log_path = ranks.ranks_root(out_dir) / f"torchrun-{node}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(cfg, cfg_path, out_dir, resume)
    log.info("launching %s", " ".join(cmd))
    try:
        code = _run_agent(cmd, log_path)
    finally:
        cfg_path.unlink(missing_ok=True)
    if code != 0:
        world = cfg.flow.nodes * max(1, cfg.flow.gpus)
        cause = ranks.diagnose(out_dir, world) or f"torchrun exited with code {code}"
        raise RankFailed(f"distill {cause}; the other ranks stopped (torchrun's log: {log_path})")
    return read_metrics(out_dir / "metrics.json")


def several_ranks(cfg) -> bool:
    """Distill runs under torchrun: several GPUs on this node, or several nodes."""
    return cfg.flow.gpus > 1 or cfg.flow.nodes > 1


def distill_cli(cfg, args) -> int:
    out_id, resume = getattr(args, "out_id", None), bool(getattr(args, "resume", False))
    if several_ranks(cfg):
        metrics = launch(cfg, output_dir(cfg, out_id), resume=resume)
    else:
        metrics = distill(cfg, out_id=out_id, resume=resume, manifest=getattr(args, "manifest", None))
    print(summary_line(metrics))
    return 0


def _run_agent(cmd: list[str], log_path: Path) -> int:
    """torchrun in a session of its own, its output copied to ``log_path`` and to stderr until a failure
    starts; a cancelled or crashed caller stops it with its ranks."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)

    def pump() -> None:
        quiet = False
        with open(log_path, "a", encoding="utf-8") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                quiet = quiet or bool(_FAILURE_START.search(line))
                if not quiet:
                    sys.stderr.write(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc)
        t.join(10)
    return proc.returncode


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
