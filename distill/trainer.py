"""The generic trainer (in the manner of mdistiller's ``engine/trainer.py``): per epoch the method's
selection pass over the pool (``select_epoch``), training on what it selected (``train_epoch``),
evaluation (``evaluate``), and an atomic checkpoint + logs (``save``). Any method of
:mod:`distill.methods` plugs in; the trainer knows only its interface.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from pipeline.core.checkpoint import save_checkpoint, save_torchscript
from pipeline.core.errors import DataError
from pipeline.core.io import atomic_path
from pipeline.core.records import SelectionRow, append_selection, read_manifest, read_metrics, truncate_selection, \
    write_metrics, write_pool_keys

from .data import LabelledFolder, build_transforms, open_web_data
from .methods import Selection, create_method
from .models import count_params, create_model, deployed_cost
from .ranks import RankWatch, record_failure
from .runtime import Runtime, evaluate, fmt_duration, gather_rng, loader, make_scheduler, progress, seed_all, \
    set_progress_every, set_rng_state
from .teacher import load_teacher

log = logging.getLogger("kd3.distill")


@dataclass
class EpochSelection:
    """The selection of one epoch as the trainer uses it: pool indices, counts per class, time."""

    selection: Selection
    indices: torch.Tensor
    per_class: dict[str, int]
    seconds: float


class Trainer:
    """One distillation run into ``out_dir``: built from the config, the manifest and the teacher."""

    def __init__(self, cfg, manifest_path: Path, teacher_path: Path, out_dir: Path, rt: Runtime):
        dc = self.dc = cfg.distill
        self.cfg, self.rt, self.out_dir = cfg, rt, Path(out_dir)
        seed_all(dc.seed + rt.rank)
        manifest = read_manifest(manifest_path)  # read once: classes, shards, keys
        self.classes = list(manifest["classes"])
        self.teacher, self.tmeta = load_teacher(teacher_path, rt.device, classes=self.classes,
                                                classes_from=f"manifest {Path(manifest_path).name}")
        if rt.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.size = int(dc.img_size or self.tmeta["input_size"])
        self.mean, self.std = self.tmeta["mean"], self.tmeta["std"]
        self.data = open_web_data(manifest_path, self.size, self.mean, self.std, dc.augment, dc.val_fraction,
                                  keys_file=dc.keys_file, manifest=manifest, part=(rt.rank, rt.world))
        self.pool = self.data.pool
        self.pool_labels = torch.tensor(self.pool.labels, dtype=torch.long)  # query labels, for per-class counts
        self.pool_plain = self.pool.subset(list(range(len(self.pool))),
                                           transform=build_transforms(self.size, self.mean, self.std, train=False))
        K = len(self.classes)
        log.info("distill %s: %d pool images, %d held out, %d classes, teacher %s, student %s, device %s x%d",
                 dc.method, len(self.pool), len(self.data.holdout or []), K, self.tmeta["arch"], dc.student,
                 rt.device, rt.world)
        student = create_model(dc.student, K, **dc.student_settings)
        self.method = create_method(dc.method, student, self.teacher, dc.method_config(), K,
                                    student_arch=dc.student, student_kwargs=dc.student_settings).to(rt.device)
        if rt.channels_last:
            self.method.to(memory_format=torch.channels_last)
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=dc.lr, momentum=dc.momentum, weight_decay=dc.weight_decay)
        self.sched = make_scheduler(self.opt, dc)
        self.metrics = {"method": dc.method, "student": dc.student,
                        "teacher": {"path": str(teacher_path), **self.tmeta}, "config": cfg.public_dict()["distill"],
                        "classes": self.classes, "world_size": rt.world, "epochs": [], "final": None}
        self.bs_local = max(1, dc.batch_size // rt.world)
        self.teacher_top1: Optional[float] = None
        self.confusion: Optional[list] = None  # the student's on eval_dir, last evaluation: [true][predicted]
        self.total_imgs = self.total_train_s = 0.0
        self.model = self.method  # DDP-wrapped by ``prepare``

    # ---------------------------------------------------------------- paths
    @property
    def ck_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def sel_path(self) -> Path:
        return self.out_dir / "selection.jsonl"

    def resume(self) -> int:
        """Load the last epoch checkpoint (model, optimiser, scheduler, selection state, RNG); next epoch."""
        ck = torch.load(self.ck_path, map_location="cpu", weights_only=True)
        self.method.load_state_dict(ck["method"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.method.load_extra_state(json.loads(ck["extra_state"]))
        rngs = ck["rng"]
        set_rng_state(rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0])
        start = int(ck["epoch"]) + 1
        if self.metrics_path.is_file():
            self.metrics["epochs"] = [e for e in read_metrics(self.metrics_path).get("epochs", []) if e["epoch"] < start]
        log.info("resumed from %s at epoch %d", self.ck_path, start)
        return start

    def warm_start(self, checkpoint: Path) -> None:
        """Start from another run's weights (the loop's last round), on this run's pool, which may have grown
        since: the method's parameters and buffers only; optimiser, schedule and selection start afresh (a
        pool-sized selection state, such as dfnd's one-off choice, is made again over the new pool)."""
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            self.method.load_state_dict(ck["method"])
        except (KeyError, RuntimeError) as e:
            raise DataError(f"{checkpoint}: cannot start {self.dc.method}/{self.dc.student} from it "
                            f"({str(e).splitlines()[0]})") from None
        self.metrics["init_from"] = str(checkpoint)
        log.info("warm start from %s (%d pool images now)", checkpoint, len(self.pool))

    def prepare(self, start: int) -> None:
        """Pool keys and a selection log that ends before ``start``; DDP; the eval set."""
        rt = self.rt
        if rt.main and not (self.out_dir / "pool_keys.txt").exists():
            write_pool_keys(self.out_dir / "pool_keys.txt", (s.key for s in self.pool.samples))
        if rt.main:  # drop rows of epochs after the checkpoint (a crash mid-epoch)
            truncate_selection(self.sel_path, start)
        if rt.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP  # only under torchrun

            self.model = DDP(self.method, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if self.dc.anchor_dir is not None and hasattr(self.method, "anchor_batches"):
            anchors = LabelledFolder(self.dc.anchor_dir, self.classes,
                                     build_transforms(self.size, self.mean, self.std, train=False), "distill.anchor_dir")
            self.method.anchor_batches = lambda: (rt.to_input(x) for x, _ in
                                                  loader(anchors, self.bs_local * 2, self.dc.workers, rt))
        self.eval_ds, self.eval_kind = None, "web-holdout"
        if self.dc.eval_dir is not None:
            self.eval_ds = LabelledFolder(self.dc.eval_dir, self.classes,
                                          build_transforms(self.size, self.mean, self.std, train=False))
            self.eval_kind = "eval_dir"

    # ---------------------------------------------------------------- one epoch
    def _infer(self, epoch: int) -> Callable:
        """``infer(fn)``: no_grad pass of fn over this rank's strided share of the pool, gathered in pool order."""
        rt, pool, K = self.rt, self.pool, len(self.classes)

        def infer(fn, augment: bool = True):
            """``augment``: the training augmentation (the release's selection pass) or the eval transform."""
            n = len(pool)
            view = pool if augment else self.pool_plain
            batches = loader(torch.utils.data.Subset(view, list(range(rt.rank, n, rt.world))), self.bs_local * 2,
                             self.dc.workers, rt)
            outs = []
            with torch.no_grad():
                for x, _ in progress(batches, len(batches), f"select e{epoch}", rt.main):
                    with rt.autocast():
                        outs.append(fn(rt.to_input(x)).float())
            local = torch.cat(outs) if outs else torch.zeros((0, K), device=rt.device)
            return rt.gather_rows(local, n).cpu()

        return infer

    def select_epoch(self, epoch: int) -> EpochSelection:
        t0 = time.perf_counter()
        self.method.eval()
        sel = self.method.select(epoch, self.dc.epochs, self._infer(epoch))
        self.method.train()
        idx = torch.arange(len(self.pool)) if sel.indices is None else sel.indices.cpu().long()
        labels = (sel.predictions if sel.predictions is not None else self.pool_labels)[idx].long()
        K = len(self.classes)
        counts = torch.bincount(labels[(labels >= 0) & (labels < K)], minlength=K).tolist()
        per_class = dict(zip(self.classes, counts))
        return EpochSelection(sel, idx, per_class, time.perf_counter() - t0)

    def train_epoch(self, epoch: int, sel: torch.Tensor, cycle: bool = False) -> dict:
        """Train on the shuffled selection (same permutation on every rank, strided shards)."""
        rt, dc = self.rt, self.dc
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(dc.seed * 100003 + epoch)
        order = sel[torch.randperm(len(sel), generator=g)].tolist()
        if cycle and order and len(order) < len(self.pool):
            # as many steps as an epoch over the whole pool: cycle the shuffled selection
            order = (order * math.ceil(len(self.pool) / len(order)))[: len(self.pool)]
        if rt.ddp and order:
            per = math.ceil(len(order) / rt.world)
            order = (order * (rt.world * per // max(1, len(order)) + 1))[: per * rt.world]
        mine = order[rt.rank::rt.world]
        sums: dict[str, float] = {}
        nb = n_img = 0
        if len(mine) >= 2:
            batches = loader(torch.utils.data.Subset(self.pool, mine), self.bs_local, dc.workers, rt)
            n_batches = len(batches) - (1 if len(mine) % self.bs_local == 1 else 0)  # a batch of one breaks BN
            for bi, (x, _) in enumerate(progress(batches, n_batches, f"train e{epoch}", rt.main)):
                if bi >= n_batches:
                    break
                x = rt.to_input(x)
                with rt.autocast():
                    losses = self.model(x)
                total = self.method.total_loss(losses)
                self.opt.zero_grad(set_to_none=True)
                total.backward()
                self.opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["total"] = sums.get("total", 0.0) + float(total.detach())
                nb += 1
                n_img += x.shape[0]
        else:
            log.warning("epoch %d: %d images selected, nothing to train on", epoch, len(sel))
        lr = self.opt.param_groups[0]["lr"]
        with warnings.catch_warnings():  # an epoch that selected nothing steps the schedule, not the optimizer
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.sched.step()
        t_train = time.perf_counter() - t1
        self.total_imgs += n_img * rt.world
        self.total_train_s += t_train
        sums, nb = rt.sum_across((sums, nb))  # the epoch's loss over every rank's batches
        return {"losses": {k: v / max(1, nb) for k, v in sums.items()}, "lr": lr, "n_img": n_img, "time": t_train}

    def evaluate(self) -> dict:
        """Rank 0: student top-1 on ``eval_dir`` (+ the teacher's) and agreement on the held-out web slice."""
        out: dict = {}
        if not self.rt.main:
            return out
        rt, bs, workers = self.rt, self.bs_local * 2, self.dc.workers
        self.method.eval()
        if self.eval_ds is not None:
            r = evaluate(self.method.predict, self.teacher, loader(self.eval_ds, bs, workers, rt), rt, True,
                         group_of=lambda y: y)
            out.update(eval_top1=r.get("top1"), eval_agreement=r.get("agreement"),
                       eval_top1_per_class=self._per_class(r, "top1"))
            self.teacher_top1, self.confusion = r.get("teacher_top1"), r.get("confusion")
        if self.data.holdout is not None:
            labels = torch.tensor(self.data.holdout.labels)  # the query class of each held-out image
            r = evaluate(self.method.predict, self.teacher, loader(self.data.holdout, bs, workers, rt), rt, False,
                         group_of=lambda i: labels[i])
            out.update(val_agreement=r.get("agreement"), val_agreement_per_class=self._per_class(r, "agreement"))
        self.method.train()
        return out

    def _per_class(self, r: dict, what: str) -> dict[str, float]:
        """{class name: value} from ``evaluate``'s per-group results (groups = class indices)."""
        return {self.classes[g]: v[what] for g, v in (r.get("per_group") or {}).items() if 0 <= g < len(self.classes)}

    def save(self, epoch: int, row: dict, es: EpochSelection, rngs: list) -> None:
        """Rank 0: the epoch's selection row, metrics.json, then the checkpoint (each atomic). The checkpoint
        goes last: a crash before it resumes at this epoch, and the resume drops the rows it wrote."""
        slog = es.selection.log
        thr = slog.get("thresholds")
        append_selection(self.sel_path, SelectionRow.of(
            epoch, self.pool.keys, None if es.selection.indices is None else es.indices.tolist(),
            alpha=slog.get("alpha"), thresholds={c: float(t) for c, t in zip(self.classes, thr)} if thr else None,
            selected_per_class=es.per_class, extra={k: v for k, v in slog.items() if k not in ("alpha", "thresholds")}))
        obj = {"epoch": epoch, "method": self.method.state_dict(), "optimizer": self.opt.state_dict(),
               "scheduler": self.sched.state_dict(), "extra_state": json.dumps(self.method.extra_state()),
               "rng": rngs}
        write_metrics(self.metrics_path, self.metrics)
        with atomic_path(self.ck_path) as tmp:
            torch.save(obj, tmp)

    # ---------------------------------------------------------------- the run
    def fit(self, start: int, on_epoch_end: Optional[Callable[[int], None]] = None) -> dict:
        dc, rt = self.dc, self.rt
        for e in range(start, dc.epochs):
            t0 = time.perf_counter()
            es = self.select_epoch(e)
            tr = self.train_epoch(e, es.indices, es.selection.cycle)
            t2 = time.perf_counter()
            row = {"epoch": e, "losses": tr["losses"], "lr": tr["lr"], "selected": int(len(es.indices)), "trained": tr["n_img"] * rt.world,
                   "selected_per_class": es.per_class, "eval_top1": None, "val_agreement": None}
            row.update(self.evaluate())
            row.update(time_s=time.perf_counter() - t0, time_select_s=es.seconds, time_train_s=tr["time"],
                       time_eval_s=time.perf_counter() - t2,
                       train_img_s=(tr["n_img"] * rt.world / tr["time"]) if tr["time"] > 0 else None,
                       alpha=es.selection.log.get("alpha"))
            self.metrics["epochs"].append(row)
            rngs = gather_rng(rt)  # a collective: every rank takes part
            if rt.main:
                self.save(e, row, es, rngs)
                log.info("epoch %d/%d: selected %d/%d, loss %s, lr %.4g, eval_top1 %s, val_agreement %s, %.1fs "
                         "(select %.1fs, train %.1fs, eval %.1fs), ETA %s", e + 1, dc.epochs, len(es.indices),
                         len(self.pool), {k: round(v, 4) for k, v in row["losses"].items()}, tr["lr"],
                         _fmt(row["eval_top1"]), _fmt(row["val_agreement"]), row["time_s"], es.seconds, tr["time"],
                         row["time_eval_s"], fmt_duration(row["time_s"] * (dc.epochs - e - 1)))
            rt.barrier()
            if on_epoch_end is not None:
                on_epoch_end(e)
        final = self.finish() if rt.main else None
        rt.barrier()
        if rt.ddp:
            dist.destroy_process_group()
        return self.metrics if final is not None else read_metrics(self.metrics_path)

    def export(self) -> Optional[str]:
        """``student.pt`` (the checkpoint contract) and ``student.torchscript.pt``; the latter's name or None."""
        arch, kwargs, module = self.method.export()
        module = module.eval()
        self.exported = module
        save_checkpoint(self.out_dir / "student.pt", arch, self.classes, self.size, self.mean, self.std,
                        module.state_dict(), arch_kwargs=kwargs)
        meta = {"arch": arch, "arch_kwargs": kwargs, "classes": self.classes, "input_size": self.size,
                "mean": self.mean, "std": self.std}
        try:
            x = torch.randn(2, 3, self.size, self.size, device=next(module.parameters()).device)
            mod32 = module.float()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace_module(mod32, {"forward": x, "forward_features": x})
            save_torchscript(self.out_dir / "student.torchscript.pt", traced.cpu(), meta)
        except Exception as e:  # pragma: no cover - architecture-specific tracing failures
            log.warning("TorchScript export failed (%s: %s); student.pt is still complete", type(e).__name__, e)
            return None
        return "student.torchscript.pt"

    def finish(self) -> dict:
        """Rank 0: export the student and write ``final`` (last epoch; best epoch on the web slice)."""
        ts = self.export()
        epochs = self.metrics["epochs"]
        last = epochs[-1] if epochs else {}
        vals = [(r["val_agreement"], r["epoch"]) for r in epochs if r.get("val_agreement") is not None]
        best = max(vals) if vals else None
        if self.eval_kind == "eval_dir":
            top1, t_top1, agree = last.get("eval_top1"), self.teacher_top1, last.get("eval_agreement")
        else:  # no labels: top1 is top-1 agreement with the teacher on the held-out web slice
            top1, t_top1, agree = last.get("val_agreement"), None, last.get("val_agreement")
        pool_n = len(self.pool)
        self.metrics["final"] = {
            "done": True, "epochs": len(epochs), "top1": top1, "teacher_top1": t_top1, "agreement": agree,
            "val_agreement": last.get("val_agreement"), "eval": self.eval_kind,
            "eval_top1_per_class": last.get("eval_top1_per_class"),
            "val_agreement_per_class": last.get("val_agreement_per_class"),
            "best_val_epoch": best[1] if best else None, "best_val_agreement": best[0] if best else None,
            **deployed_cost(self.exported, self.size), "teacher_params": count_params(self.teacher),
            "throughput_img_s": (self.total_imgs / self.total_train_s) if self.total_train_s > 0 else None,
            "selected_fraction": (last.get("selected", 0) / pool_n) if pool_n else None,
            "student_path": "student.pt", "torchscript_path": ts,
            "confusion": self.confusion if self.eval_kind == "eval_dir" else None,
        }
        write_metrics(self.metrics_path, self.metrics)
        log.info("distill done: top1 %s (%s), teacher top1 %s, agreement %s, params %d", _fmt(top1),
                 self.eval_kind, _fmt(t_top1), _fmt(agree), self.metrics["final"]["params"])
        return self.metrics["final"]


def _fmt(v):
    return "-" if v is None else f"{v:.4f}"


def run_training(cfg, manifest_path: Path, teacher_path: Path, out_dir: Path, *, resume: bool = False,
                 on_epoch_end: Optional[Callable[[int], None]] = None, init_from: Optional[Path] = None) -> dict:
    dc = cfg.distill
    rt = Runtime(dc.device, dc.amp, dc.channels_last)
    set_progress_every(dc.log_every)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file() and (read_metrics(metrics_path).get("final") or {}).get("done"):
        log.info("distill: %s is complete; nothing to do", out_dir)
        return read_metrics(metrics_path)
    if (out_dir / "checkpoint.pt").is_file() and not resume:
        raise DataError(f"{out_dir} holds an unfinished run: pass --resume to continue it or --out-id for a new one")
    handler = None
    if rt.main:
        handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("kd3").addHandler(handler)
        if logging.getLogger("kd3").getEffectiveLevel() > logging.INFO:
            logging.getLogger("kd3").setLevel(logging.INFO)
    watch = _watch_ranks(cfg, rt, out_dir)
    try:
        trainer = Trainer(cfg, manifest_path, teacher_path, out_dir, rt)
        start = trainer.resume() if resume and trainer.ck_path.is_file() else 0
        if start == 0 and init_from is not None:
            trainer.warm_start(Path(init_from))
        trainer.prepare(start)
        return trainer.fit(start, on_epoch_end)
    except BaseException as e:
        if watch is not None:
            record_failure(e)
        _remove_if_unstarted(out_dir, created and rt.main, handler)
        raise
    finally:
        if watch is not None:
            watch.finish()
        if handler is not None:
            logging.getLogger("kd3").removeHandler(handler)
            handler.close()


def _watch_ranks(cfg, rt: Runtime, out_dir: Path) -> Optional[RankWatch]:
    """Under torchrun: this rank's heartbeat, so a dead rank is named (distill.ranks)."""
    if not rt.ddp:
        return None
    token = [uuid.uuid4().hex[:12] if rt.main else None]
    dist.broadcast_object_list(token, src=0)  # after rank 0 made the output folder
    return RankWatch(out_dir, token[0], rt.rank, rt.world, cfg.flow.rank_timeout_s).start()


def _remove_if_unstarted(out_dir: Path, ours: bool, handler) -> None:
    """A start refused by what only the data shows (a corrupt shard, no image) or cut before the first
    epoch checkpoint leaves no output folder: nothing in it could be resumed."""
    if not ours or (out_dir / "checkpoint.pt").exists():
        return
    if handler is not None:
        logging.getLogger("kd3").removeHandler(handler)
        handler.close()
    shutil.rmtree(out_dir, ignore_errors=True)
