"""Where training runs: device, DDP (torchrun), bf16 autocast, channels_last; RNG state; loaders;
evaluation. Same code on CPU, one GPU, or many GPUs under torchrun."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.core.errors import ConfigError

from .data import WebPool, collate_indexed

log = logging.getLogger("kd3.distill")


# ---------------------------------------------------------------- runtime (device, DDP, amp)
class Runtime:
    def __init__(self, device: str = "auto", amp: str = "auto", channels_last: bool = True):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if self.world > 1 and device == "cuda":
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.ddp = self.world > 1
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        use_amp = amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_amp else None
        # channels_last on the CPU too: oneDNN's convolutions are faster on it (one thread, batch 64 at 32 px:
        # an SGD step of cnn_small 1.3x, cnn_tiny 1.5x); results stay deterministic and resume-exact (tests)
        self.channels_last = bool(channels_last)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sum_across(self, part: tuple[dict, int]) -> tuple[dict, int]:
        """(per-key sums, count) added up over the ranks (as they are, outside torchrun)."""
        if not self.ddp:
            return part
        parts: list = [None] * self.world
        dist.all_gather_object(parts, part)
        sums: dict = {}
        for d, _ in parts:
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + v
        return sums, sum(n for _, n in parts)

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def gather_rows(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        """Reassemble per-rank outputs of the strided shard ``rank::world`` into pool order."""
        if not self.ddp:
            return local
        n_max = math.ceil(n_total / self.world)
        pad = torch.zeros((n_max,) + tuple(local.shape[1:]), dtype=local.dtype, device=self.device)
        pad[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        out = torch.empty((n_total,) + tuple(local.shape[1:]), dtype=local.dtype)
        for r, part in enumerate(parts):
            n_r = len(range(r, n_total, self.world))
            out[r::self.world] = part[:n_r].cpu()
        return out


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_clamp_noted: set[tuple[int, int]] = set()


def usable_workers(workers: int) -> int:
    """``distill.workers`` capped at the CPU cores this process may use (more only contend, and torch
    warns about it); says so once."""
    cpus = available_cpus()
    if workers <= cpus:
        return workers
    if (workers, cpus) not in _clamp_noted:
        _clamp_noted.add((workers, cpus))
        log.info("distill.workers %d > %d CPU cores available: using %d data loader workers", workers, cpus, cpus)
    return cpus


def loader(ds, batch_size: int, workers: int, rt: Runtime, shuffle: bool = False, drop_last: bool = False):
    """A DataLoader; pool views (a WebPool or a Subset of one) yield (images, pool indices)."""
    workers = usable_workers(workers)
    pooled = isinstance(ds, WebPool) or isinstance(getattr(ds, "dataset", None), WebPool)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      pin_memory=rt.device.type == "cuda", collate_fn=collate_indexed if pooled else None,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


_LOG_EVERY = [50]


def set_progress_every(n: int) -> None:
    """``distill.log_every``: batches between progress lines when stderr is not a terminal."""
    _LOG_EVERY[0] = max(1, int(n))


def progress(it, total: int, desc: str, enabled: bool):
    """A progress bar with rate and ETA on a terminal; otherwise a log line every ``distill.log_every``
    batches (a 5-minute epoch in a log file or a Prefect worker still says how far it is)."""
    if not enabled:
        return it
    if sys.stderr.isatty():
        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return _logged(it, total, desc, _LOG_EVERY[0])


def _logged(it, total: int, desc: str, every: int):
    t0 = time.perf_counter()
    for i, item in enumerate(it, 1):
        yield item
        if i % every == 0 and i < total:
            dt = time.perf_counter() - t0
            log.info("%s: %d/%d batches (%d%%), %.1f batches/s, ETA %s", desc, i, total, 100 * i // total,
                     i / dt if dt > 0 else 0.0, fmt_duration(dt / i * (total - i)))


def fmt_duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def make_scheduler(opt, dc):
    """``distill.lr_schedule``: ``step`` (x0.1 at ``lr_milestones``, the release) or ``cosine`` (to 0 over
    the epochs); stepped once per epoch."""
    if dc.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, dc.epochs))
    milestones = sorted({max(1, int(round(f * dc.epochs))) for f in dc.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)


# ---------------------------------------------------------------- RNG state (checkpointed)
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(_py_state_to_list(random.getstate()))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py_state_to_list(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(predict: Callable, teacher: nn.Module, batches, rt: Runtime, labelled: bool,
             group_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Top-1 of the student (and the teacher) against labels, student-teacher agreement, with labels the
    student's confusion matrix (``confusion[true][predicted]`` counts), and with ``group_of`` (batch
    targets -> group ids) the same per group under ``per_group``."""
    n = correct_s = correct_t = agree = 0
    conf = None
    groups: dict[int, list[int]] = {}
    for x, y in batches:
        x = rt.to_input(x)
        with rt.autocast():
            zs = predict(x).float()
            zt = teacher(x).float()
        ps, pt = zs.argmax(1).cpu(), zt.argmax(1).cpu()
        n += len(ps)
        agree += int((ps == pt).sum())
        if labelled:
            correct_s += int((ps == y).sum())
            correct_t += int((pt == y).sum())
            k = zs.shape[1]
            conf = (0 if conf is None else conf) + torch.bincount(y.long() * k + ps, minlength=k * k).view(k, k)
        if group_of is not None:
            for g, a, c in zip(group_of(y).tolist(), (ps == pt).tolist(), (ps == y).tolist()):
                cell = groups.setdefault(int(g), [0, 0, 0])
                cell[0], cell[1], cell[2] = cell[0] + 1, cell[1] + int(a), cell[2] + int(c)
    if n == 0:
        return {}
    out = {"n": n, "agreement": agree / n}
    if labelled:
        out.update(top1=correct_s / n, teacher_top1=correct_t / n, confusion=conf.tolist())
    if group_of is not None:
        out["per_group"] = {g: {"n": c[0], "agreement": c[1] / c[0], **({"top1": c[2] / c[0]} if labelled else {})}
                            for g, c in sorted(groups.items())}
    return out


def gather_rng(rt: Runtime) -> list:
    """Every rank's RNG state (rank order), so a resumed DDP run continues each rank's stream."""
    mine = rng_state()
    if not rt.ddp:
        return [mine]
    gathered: list = [None] * rt.world
    dist.all_gather_object(gathered, {k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()})
    return gathered
