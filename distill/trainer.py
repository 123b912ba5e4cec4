"""Generic trainer: per epoch, the method's selection pass over the pool, then training on the selected
subset; eval; an atomic checkpoint; metrics. Same code on CPU, one GPU, or many GPUs under torchrun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from pipeline.checkpoint import save_checkpoint, save_torchscript
from pipeline.errors import ConfigError, DataError
from pipeline.io import JsonlAppender, atomic_path, atomic_write_json, read_json, read_jsonl, write_jsonl_atomic

from .data import LabelledFolder, WebPool, build_transforms, collate_indexed, open_web_data
from .methods import create_method
from .models import count_params, create_model
from .teacher import load_teacher

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
        self.channels_last = bool(channels_last) and self.device.type == "cuda"

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


def _loader(ds, batch_size: int, workers: int, rt: Runtime, shuffle: bool = False, drop_last: bool = False):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      pin_memory=rt.device.type == "cuda", collate_fn=collate_indexed if isinstance(ds, WebPool) else None,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


def _progress(it, total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, leave=False, disable=not enabled or None, dynamic_ncols=True)


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
def evaluate(predict: Callable, teacher: nn.Module, loader, rt: Runtime, labelled: bool) -> dict:
    """Top-1 of the student (and the teacher) against labels, and student-teacher agreement."""
    n = correct_s = correct_t = agree = 0
    for x, y in loader:
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
    if n == 0:
        return {}
    out = {"n": n, "agreement": agree / n}
    if labelled:
        out.update(top1=correct_s / n, teacher_top1=correct_t / n)
    return out


# ---------------------------------------------------------------- the training run
def default_out_id(cfg, teacher_path: Path) -> str:
    d = cfg.public_dict()["distill"]
    d.pop("workers", None)
    d.pop("device", None)
    h = hashlib.sha256(json.dumps({"d": d, "teacher": str(Path(teacher_path).resolve())}, sort_keys=True,
                                  default=str).encode()).hexdigest()
    return h[:8]


def run_training(cfg, manifest_path: Path, teacher_path: Path, out_dir: Path, *, resume: bool = False,
                 on_epoch_end: Optional[Callable[[int], None]] = None) -> dict:
    dc = cfg.distill
    rt = Runtime(dc.device, dc.amp, dc.channels_last)
    out_dir = Path(out_dir)
    ck_path = out_dir / "checkpoint.pt"
    metrics_path = out_dir / "metrics.json"
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if metrics_path.is_file() and (read_json(metrics_path).get("final") or {}).get("done"):
        log.info("distill: %s is complete; nothing to do", out_dir)
        return read_json(metrics_path)
    if ck_path.is_file() and not resume:
        raise DataError(f"{out_dir} holds an unfinished run: pass --resume to continue it or --out-id for a new one")

    handler = None
    if rt.main:
        handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("kd3").addHandler(handler)
        if logging.getLogger("kd3").getEffectiveLevel() > logging.INFO:
            logging.getLogger("kd3").setLevel(logging.INFO)
    try:
        return _run(cfg, dc, rt, manifest_path, teacher_path, out_dir, ck_path, metrics_path, resume, on_epoch_end)
    finally:
        if handler is not None:
            logging.getLogger("kd3").removeHandler(handler)
            handler.close()


def _run(cfg, dc, rt: Runtime, manifest_path, teacher_path, out_dir, ck_path, metrics_path, resume, on_epoch_end):
    from .data import load_manifest

    seed_all(dc.seed + rt.rank)
    man = load_manifest(manifest_path)
    classes = list(man["classes"])
    teacher, tmeta = load_teacher(teacher_path, rt.device, classes=classes,
                                  classes_from=f"manifest {Path(manifest_path).name}")
    if rt.channels_last:
        teacher.to(memory_format=torch.channels_last)
    size = int(dc.img_size or tmeta["input_size"])
    mean, std = tmeta["mean"], tmeta["std"]
    data = open_web_data(manifest_path, size, mean, std, dc.augment, dc.val_fraction)
    pool = data.pool
    K = len(classes)
    log.info("distill %s: %d pool images, %d held out, %d classes, teacher %s, student %s, device %s x%d",
             dc.method, len(pool), len(data.holdout or []), K, tmeta["arch"], dc.student, rt.device, rt.world)

    student = create_model(dc.student, K)
    method = create_method(dc.method, student, teacher, dc, K, student_arch=dc.student).to(rt.device)
    if rt.channels_last:
        method.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=dc.lr, momentum=dc.momentum, weight_decay=dc.weight_decay)
    milestones = sorted({max(1, int(round(f * dc.epochs))) for f in dc.lr_milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    metrics = {"method": dc.method, "student": dc.student, "teacher": {"path": str(teacher_path), **tmeta},
               "config": cfg.public_dict()["distill"], "classes": classes, "world_size": rt.world, "epochs": [],
               "final": None}
    start = 0
    if resume and ck_path.is_file():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        method.load_extra_state(json.loads(ck["extra_state"]))
        rngs = ck["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
        start = int(ck["epoch"]) + 1
        if metrics_path.is_file():
            metrics["epochs"] = [e for e in read_json(metrics_path).get("epochs", []) if e["epoch"] < start]
        log.info("resumed from %s at epoch %d", ck_path, start)
    sel_path = out_dir / "selection.jsonl"
    if rt.main and not (out_dir / "pool_keys.txt").exists():
        from pipeline.io import atomic_write_text

        atomic_write_text(out_dir / "pool_keys.txt", "".join(s.key + "\n" for s in pool.samples))
    if rt.main and sel_path.exists():  # drop rows of epochs after the checkpoint (a crash mid-epoch)
        write_jsonl_atomic(sel_path, [r for r in read_jsonl(sel_path) if r.get("epoch", -1) < start])

    model = method
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(method, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    eval_ds = None
    eval_kind = "web-holdout"
    eval_t = build_transforms(size, mean, std, train=False)
    if dc.eval_dir is not None:
        eval_ds = LabelledFolder(dc.eval_dir, classes, eval_t)
        eval_kind = "eval_dir"
    bs_local = max(1, dc.batch_size // rt.world)
    workers = dc.workers

    def infer(fn):
        """no_grad pass of fn over this rank's strided share of the pool; gathered in pool order."""
        n = len(pool)
        mine = list(range(rt.rank, n, rt.world))
        loader = _loader(torch.utils.data.Subset(pool, mine), bs_local * 2, workers, rt)
        loader.collate_fn = collate_indexed
        outs = []
        with torch.no_grad():
            for x, _ in _progress(loader, len(loader), f"select e{epoch}", rt.main):
                with rt.autocast():
                    outs.append(fn(rt.to_input(x)).float())
        local = torch.cat(outs) if outs else torch.zeros((0, K), device=rt.device)
        return rt.gather_rows(local, n).cpu()

    teacher_eval_cache: dict = {}
    total_imgs = total_train_s = 0.0
    for e in range(start, dc.epochs):
        epoch = e
        t0 = time.perf_counter()
        method.eval()
        idx, sel_log = method.select(e, dc.epochs, infer)
        method.train()
        t_sel = time.perf_counter() - t0
        all_sel = idx is None
        sel = torch.arange(len(pool)) if idx is None else idx.cpu().long()
        pred = sel_log.pop("pred", None) if isinstance(sel_log, dict) else None
        if pred is None and hasattr(method, "last_selection"):
            pred = method.last_selection.get("pred")
        labels_for_count = pred[sel] if pred is not None else torch.tensor([pool.samples[i].label for i in sel.tolist()])
        per_class = {c: 0 for c in classes}
        for c_idx in labels_for_count.tolist():
            if 0 <= c_idx < K:
                per_class[classes[c_idx]] += 1

        # ---- train on the shuffled selection (same permutation on every rank, strided shards)
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(dc.seed * 100003 + e)
        order = sel[torch.randperm(len(sel), generator=g)].tolist()
        if rt.ddp and order:
            per = math.ceil(len(order) / rt.world)
            order = (order * (rt.world * per // max(1, len(order)) + 1))[: per * rt.world]
        mine = order[rt.rank::rt.world]
        sums: dict[str, float] = {}
        nb = n_img = 0
        if len(mine) >= 2:
            loader = _loader(torch.utils.data.Subset(pool, mine), bs_local, workers, rt)
            loader.collate_fn = collate_indexed
            n_batches = len(loader)
            if len(mine) % bs_local == 1:  # a last batch of one breaks train-mode BN
                n_batches -= 1
            for bi, (x, _) in enumerate(_progress(loader, n_batches, f"train e{e}", rt.main)):
                if bi >= n_batches:
                    break
                x = rt.to_input(x)
                with rt.autocast():
                    losses = model(x)
                total = sum(method.loss_weights.get(k, 1.0) * v.float() for k, v in losses.items())
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["total"] = sums.get("total", 0.0) + float(total.detach())
                nb += 1
                n_img += x.shape[0]
        else:
            log.warning("epoch %d: %d images selected, nothing to train on", e, len(sel))
        lr = opt.param_groups[0]["lr"]
        sched.step()
        t_train = time.perf_counter() - t1
        total_imgs += n_img * rt.world
        total_train_s += t_train

        # ---- eval (rank 0) and bookkeeping
        t2 = time.perf_counter()
        row = {"epoch": e, "losses": {k: v / max(1, nb) for k, v in sums.items()}, "lr": lr,
               "selected": int(len(sel)), "selected_per_class": per_class, "eval_top1": None,
               "val_agreement": None}
        if rt.main:
            method.eval()
            if eval_ds is not None:
                r = evaluate(method.predict, teacher, _loader(eval_ds, bs_local * 2, workers, rt), rt, True)
                row["eval_top1"] = r.get("top1")
                row["eval_agreement"] = r.get("agreement")
                teacher_eval_cache["teacher_top1"] = r.get("teacher_top1")
            if data.holdout is not None:
                r = evaluate(method.predict, teacher, _loader(data.holdout, bs_local * 2, workers, rt), rt, False)
                row["val_agreement"] = r.get("agreement")
            method.train()
        t_eval = time.perf_counter() - t2
        row.update(time_s=time.perf_counter() - t0, time_select_s=t_sel, time_train_s=t_train, time_eval_s=t_eval,
                   train_img_s=(n_img * rt.world / t_train) if t_train > 0 else None,
                   alpha=sel_log.get("alpha") if isinstance(sel_log, dict) else None)
        metrics["epochs"].append(row)
        rngs = _gather_rng(rt)  # a collective: every rank takes part
        if rt.main:
            thr = sel_log.get("thresholds") if isinstance(sel_log, dict) else None
            with JsonlAppender(sel_path) as app:
                app.write({"epoch": e, "alpha": sel_log.get("alpha"),
                           "thresholds": {c: float(t) for c, t in zip(classes, thr)} if thr else None,
                           "selected_per_class": per_class,
                           **_selected_field(pool, sel, all_sel),
                           **{k: v for k, v in sel_log.items() if k not in ("alpha", "thresholds")}})
            _save_checkpoint(ck_path, e, method, opt, sched, rngs)
            atomic_write_json(metrics_path, metrics)
            log.info("epoch %d/%d: selected %d/%d, loss %s, lr %.4g, eval_top1 %s, val_agreement %s, %.1fs "
                     "(select %.1fs, train %.1fs, eval %.1fs)", e + 1, dc.epochs, len(sel), len(pool),
                     {k: round(v, 4) for k, v in row["losses"].items()}, lr, _fmt(row["eval_top1"]),
                     _fmt(row["val_agreement"]), row["time_s"], t_sel, t_train, t_eval)
        rt.barrier()
        if on_epoch_end is not None:
            on_epoch_end(e)

    # ---- outputs
    final = None
    if rt.main:
        final = _finish(metrics, method, teacher, tmeta, classes, size, mean, std, out_dir, eval_kind,
                        teacher_eval_cache, total_imgs, total_train_s, len(pool))
        atomic_write_json(metrics_path, metrics)
    rt.barrier()
    if rt.ddp:
        dist.destroy_process_group()
    return metrics if final is not None else read_json(metrics_path)


KEYS_INLINE_MAX = 200_000


def _selected_field(pool: WebPool, sel: torch.Tensor, all_sel: bool) -> dict:
    """Selected keys inline for pools up to 200k images; above, a bitmask over pool_keys.txt order."""
    if all_sel:
        return {"selected_keys": "all"}
    if len(pool) <= KEYS_INLINE_MAX:
        return {"selected_keys": [pool.samples[i].key for i in sel.tolist()]}
    mask = torch.zeros(len(pool), dtype=torch.bool)
    mask[sel] = True
    bits = int("".join("1" if b else "0" for b in mask.tolist()) or "0", 2)
    return {"selected_mask_hex": format(bits, "x"), "mask_order": "pool_keys.txt"}


def _fmt(v):
    return "-" if v is None else f"{v:.4f}"


def _gather_rng(rt: Runtime) -> list:
    """Every rank's RNG state (rank order), so a resumed DDP run continues each rank's stream."""
    mine = rng_state()
    if not rt.ddp:
        return [mine]
    gathered: list = [None] * rt.world
    dist.all_gather_object(gathered, {k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()})
    return gathered


def _save_checkpoint(path: Path, epoch: int, method, opt, sched, rngs: list) -> None:
    obj = {"epoch": epoch, "method": method.state_dict(), "optimizer": opt.state_dict(),
           "scheduler": sched.state_dict(), "extra_state": json.dumps(method.extra_state()), "rng": rngs}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _finish(metrics, method, teacher, tmeta, classes, size, mean, std, out_dir: Path, eval_kind,
            teacher_eval_cache, total_imgs, total_train_s, pool_n) -> dict:
    arch, kwargs, module = method.export()
    module = module.eval()
    save_checkpoint(out_dir / "student.pt", arch, classes, size, mean, std, module.state_dict(), arch_kwargs=kwargs)
    meta = {"arch": arch, "arch_kwargs": kwargs, "classes": classes, "input_size": size, "mean": mean, "std": std}
    ts_ok = True
    try:
        dev = next(module.parameters()).device
        x = torch.randn(2, 3, size, size, device=dev)
        mod32 = module.float()
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace_module(mod32, {"forward": x, "forward_features": x})
        save_torchscript(out_dir / "student.torchscript.pt", traced.cpu(), meta)
    except Exception as e:  # pragma: no cover - architecture-specific tracing failures
        ts_ok = False
        log.warning("TorchScript export failed (%s: %s); student.pt is still complete", type(e).__name__, e)
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    vals = [(r["val_agreement"], r["epoch"]) for r in metrics["epochs"] if r.get("val_agreement") is not None]
    best = max(vals) if vals else None
    if eval_kind == "eval_dir":
        top1, t_top1, agree = last.get("eval_top1"), teacher_eval_cache.get("teacher_top1"), last.get("eval_agreement")
    else:  # no labels: top1 is top-1 agreement with the teacher on the held-out web slice
        top1, t_top1, agree = last.get("val_agreement"), None, last.get("val_agreement")
    metrics["final"] = {
        "done": True, "epochs": len(metrics["epochs"]), "top1": top1, "teacher_top1": t_top1, "agreement": agree,
        "val_agreement": last.get("val_agreement"), "eval": eval_kind,
        "best_val_epoch": best[1] if best else None, "best_val_agreement": best[0] if best else None,
        "params": count_params(module), "teacher_params": count_params(teacher),
        "throughput_img_s": (total_imgs / total_train_s) if total_train_s > 0 else None,
        "selected_fraction": (last.get("selected", 0) / pool_n) if pool_n else None,
        "student_path": "student.pt", "torchscript_path": "student.torchscript.pt" if ts_ok else None,
    }
    log.info("distill done: top1 %s (%s), teacher top1 %s, agreement %s, params %d", _fmt(top1), eval_kind,
             _fmt(t_top1), _fmt(agree), metrics["final"]["params"])
    return metrics["final"]
