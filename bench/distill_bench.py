"""Distill benchmark: per-epoch wall time of kd3 vs kd on the same pool and models, in one run.

The selection pass is included; the time is split into selection and training (eval is off:
no eval set, no held-out slice). Three runs share the data, teacher and student:
  kd            Hinton KD on every image
  kd3           KD³ as configured (its selection decides how many images it trains on)
  kd3-all       KD³ with every image kept (the release's confidence rule at tau ~ 0, no equal_steps, input mix; the
                selection pass still runs): the cost per epoch when the selection keeps everything —
                the worst case for the kd3/kd ratio
Per-image costs divide by the images an epoch trained on (``trained``: with kd3's default equal_steps
that is a pool pass, not the selected count).
Also prints training throughput (img/s, training phase only).

    python bench/distill_bench.py                       # CPU, tiny (cnn_small -> cnn_small, 32 px)
    python bench/distill_bench.py --device cuda --teacher-arch resnet34 --student resnet18 \
        --n 20000 --batch-size 256 --epochs 3 --workers 8     # GPU: bf16 autocast + channels_last
    python bench/distill_bench.py --profile                   # torch.profiler: one KD and one KD³ step, op by op

``--profile`` times training steps alone (random batch, no data loading, no selection pass) under
``torch.profiler`` for KD and for KD³ (default options, then each of ``--profile-options``): wall ms per step,
the ratio to KD, and the top operators by self CPU time, each op's share of the step.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.io import atomic_write_json, sha256_file  # noqa: E402

CLASSES = [f"digit{i}" for i in range(10)]


def digit_images(n: int, size: int, seed: int = 0):
    """n RGB images (digits, tinted/inverted/shifted variants) with their query labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        i = int(rng.integers(len(d.images)))
        a = (d.images[i] / 16.0 * 255).astype(np.uint8)
        if rng.random() < 0.2:
            a = 255 - a
        im = Image.fromarray(a, "L").resize((size, size), Image.BILINEAR).convert("RGB")
        x = np.asarray(im).astype(np.float32) * rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        out.append((Image.fromarray(x.clip(0, 255).astype(np.uint8)), int(d.target[i])))
    return out


def write_pool(root: Path, items, per_shard: int = 5000) -> Path:
    """Webdataset shards + a manifest, as the curate stage writes them."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shardlist = []
    for s0 in range(0, len(items), per_shard):
        p = root / "shards" / f"bench-{s0 // per_shard:06d}.tar"
        with tarfile.open(p, "w") as tf:
            for j, (im, y) in enumerate(items[s0:s0 + per_shard]):
                b = io.BytesIO()
                im.save(b, "PNG")
                key = f"{s0 + j:016x}"
                for ext, data in (("png", b.getvalue()), ("cls", str(y).encode()),
                                  ("json", json.dumps({"class": CLASSES[y], "label": y}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        shardlist.append({"url": f"shards/{p.name}", "nsamples": len(items[s0:s0 + per_shard]),
                          "filesize": p.stat().st_size, "sha256": sha256_file(p)})
    atomic_write_json(root / "manifest.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                               "name": root.name, "shardlist": shardlist, "classes": CLASSES,
                                               "nsamples": len(items)})
    return root / "manifest.json"


def make_teacher(base: Path, arch: str, size: int, epochs: int, device: str) -> Path:
    """A teacher trained briefly on labelled digits (so that kd3's selection sees real confidences)."""
    from distill.teacher_train import train_teacher

    folder = base / "labelled"
    for k, (im, y) in enumerate(digit_images(600, size, seed=1)):
        d = folder / CLASSES[y]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{k:05d}.png")
    out = base / "teacher.pt"
    train_teacher(folder, arch, out, epochs=epochs, img_size=size, batch_size=64, lr=0.05, device=device)
    return out


def trained(row: dict) -> int:
    """Images an epoch trained on (older metrics rows have only ``selected``)."""
    return int(row.get("trained") or row["selected"])


def epoch_times(metrics: dict, skip_first: bool) -> dict:
    rows = metrics["epochs"][1:] if skip_first and len(metrics["epochs"]) > 1 else metrics["epochs"]
    # medians over the epochs after the first (warm-up), robust to a noisy shared machine
    sel = float(np.median([r["time_select_s"] for r in rows]))
    tr = float(np.median([r["time_train_s"] for r in rows]))
    imgs = float(np.median([r["train_img_s"] or 0 for r in rows]))
    per_img = float(np.median([(r["time_select_s"] + r["time_train_s"]) / max(1, trained(r)) for r in rows]))
    return {"select_s": sel, "train_s": tr, "epoch_s": sel + tr, "train_img_s": imgs,
            "selected": float(np.mean([r["selected"] for r in rows])), "epoch_s_per_trained_image": per_img,
            "epochs_in_median": len(rows)}


def _merged(a: dict, b: dict) -> dict:
    """``b`` over ``a``, section by section (``{"kd3": {"tau": ..}}`` + ``{"kd3": {"fused_views": True}}``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


RUNS = {"kd": ("kd", {}), "kd3": ("kd3", {}),
        "kd3-all": ("kd3", {"kd3": {"selection_rule": "confidence", "equal_steps": False, "tau": 1e-9,
                                     "mix_level": "input"}})}


class DistillSetup:
    """A pool (webdataset shards + manifest) and a briefly trained teacher, shared by every run."""

    def __init__(self, n: int = 512, size: int = 32, teacher_arch: str = "cnn_small", student: str = "cnn_tiny",
                 epochs: int = 2, batch_size: int = 64, device: str = "cpu", workers: int = 0,
                 teacher_epochs: int = 3, threads: int | None = None, workdir: Path | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.n, self.size, self.teacher_arch, self.student = n, size, teacher_arch, student
        self.epochs, self.batch_size, self.device, self.workers = epochs, batch_size, device, workers
        base = Path(workdir or tempfile.mkdtemp(prefix="kd3-distill-bench-"))
        self.run = base / "runs" / "bench"
        self.manifest = write_pool(self.run, digit_images(n, size))
        self.teacher = make_teacher(base, teacher_arch, size, teacher_epochs, "cpu" if device == "cpu" else device)
        self.k = 0

    def run_method(self, label: str, **extra) -> dict:
        """One distill run (``label`` in RUNS); epoch times are medians over the epochs after the first."""
        from distill.stage import distill
        from pipeline.core.config import load_config

        method, kw = RUNS[label]
        self.k += 1
        cfg = load_config(None, {"name": "bench", "runs_root": str(self.run.parent), "teacher": str(self.teacher),
                                 "distill": {"method": method, "student": self.student, "epochs": self.epochs,
                                             "batch_size": self.batch_size, "workers": self.workers,
                                             "device": self.device, "val_fraction": 0.0, "augment": "rrc_flip",
                                             **_merged(kw, extra)}})
        t0 = time.perf_counter()
        cpu = []  # process CPU time at each epoch's end: the differences are epochs 1.. (the first is warm-up)
        m = distill(cfg, out_id=f"{label.replace('-', '_')}_{self.k}", on_epoch_end=lambda e: cpu.append(time.process_time()))
        per_img = [(c1 - c0) / max(1, trained(r)) for c0, c1, r in zip(cpu, cpu[1:], m["epochs"][1:])]
        return dict(epoch_times(m, skip_first=self.epochs > 1), wall_s=time.perf_counter() - t0,
                    final_throughput_img_s=m["final"]["throughput_img_s"],
                    cpu_s_per_trained_image=float(np.median(per_img)) if per_img else None)

    def per_image(self, label: str, **extra) -> tuple[float, float]:
        """(wall, process CPU) seconds per trained image of a ``label`` run (a key of RUNS, ``extra`` config on
        top), each the median over the epochs after the first."""
        r = self.run_method(label, **extra)
        return r["epoch_s_per_trained_image"], r["cpu_s_per_trained_image"]

    def describe(self) -> str:
        return (f"{self.n} images {self.size} px, teacher {self.teacher_arch} -> student {self.student}, batch "
                f"{self.batch_size}, {self.epochs} epochs per run (median of the last {self.epochs - 1}), "
                f"device {self.device}, loader workers {self.workers}, torch threads {torch.get_num_threads()}")


def run_bench(n: int = 512, size: int = 32, teacher_arch: str = "cnn_small", student: str = "cnn_tiny",
              epochs: int = 2, batch_size: int = 64, device: str = "cpu", workers: int = 0,
              teacher_epochs: int = 3, threads: int | None = None, workdir: Path | None = None) -> dict:
    st = DistillSetup(n, size, teacher_arch, student, epochs, batch_size, device, workers, teacher_epochs,
                      threads, workdir)
    res: dict = {"n": n, "size": size, "teacher": teacher_arch, "student": student, "epochs": epochs,
                 "batch_size": batch_size, "device": device, "threads": torch.get_num_threads(), "runs": {}}
    for label in RUNS:
        res["runs"][label] = st.run_method(label)
    kd, k3, k3a = res["runs"]["kd"], res["runs"]["kd3"], res["runs"]["kd3-all"]
    res["ratio_kd3_over_kd"] = k3["epoch_s"] / kd["epoch_s"]
    res["ratio_kd3_all_over_kd"] = k3a["epoch_s"] / kd["epoch_s"]
    res["kd3_all_select_fraction_of_epoch"] = k3a["select_s"] / k3a["epoch_s"]
    res["manifest"] = str(st.manifest)
    return res


def format_report(r: dict) -> str:
    lines = [f"distill bench: {r['n']} images {r['size']}px, teacher {r['teacher']} -> student {r['student']}, "
             f"batch {r['batch_size']}, {r['epochs']} epochs, device {r['device']}, torch threads {r['threads']}",
             f"{'run':9s} {'selected':>9s} {'select s':>9s} {'train s':>9s} {'epoch s':>9s} {'train img/s':>12s}"]
    for k, v in r["runs"].items():
        lines.append(f"{k:9s} {v['selected']:9.0f} {v['select_s']:9.3f} {v['train_s']:9.3f} {v['epoch_s']:9.3f} "
                     f"{v['train_img_s']:12.1f}")
    lines.append(f"per-epoch ratio kd3/kd = {r['ratio_kd3_over_kd']:.2f}x (kd3 keeps what it selects); "
                 f"kd3-all/kd = {r['ratio_kd3_all_over_kd']:.2f}x (every image kept); "
                 f"selection pass = {100 * r['kd3_all_select_fraction_of_epoch']:.0f}% of a kd3-all epoch")
    return "\n".join(lines)


def parse_option(opt: str) -> tuple[str, object]:
    """``KEY[=JSON]`` of a ``distill.kd3`` option -> (key, value); a bare key means True."""
    key, _, val = opt.partition("=")
    return key, json.loads(val) if val else True


def profile_steps(teacher_arch: str = "cnn_small", student: str = "cnn_small", size: int = 32, batch_size: int = 64,
                  steps: int = 20, options: list[str] | None = None, top: int = 12, threads: int | None = None) -> dict:
    """Training steps (forward, backward, SGD) of KD and KD³ under torch.profiler, on CPU, channels_last, and
    each step's FLOPs per image (FlopCounterMode, 2 per multiply-add): the floor the measured ratio is set
    against."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from distill.methods import create_method
    from distill.models import create_model
    from distill.methods.settings import Kd3Settings as Kd3Config, KdSettings as KdConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = create_model(teacher_arch, 10).eval().to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    runs = {"kd": ("kd", KdConfig()), "kd3": ("kd3", Kd3Config())}
    for opt in options or []:
        runs[f"kd3 {opt}"] = ("kd3", Kd3Config(**dict([parse_option(opt)])))
    out: dict = {"teacher": teacher_arch, "student": student, "size": size, "batch_size": batch_size,
                 "steps": steps, "threads": torch.get_num_threads(), "runs": {}}
    for label, (name, cfg) in runs.items():
        torch.manual_seed(1)
        m = create_method(name, create_model(student, 10), teacher, cfg, 10, student_arch=student)
        m.to(memory_format=torch.channels_last).train()
        sgd = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step():
            sgd.zero_grad(set_to_none=True)
            m.total_loss(m(x)).backward()
            sgd.step()

        with FlopCounterMode(display=False) as fc:  # the first step, counted; then warm-up (oneDNN caches)
            step()
        gflops = fc.get_total_flops() / batch_size / 1e9
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        ka = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ka) or 1
        out["runs"][label] = {"ms_per_step": ms, "gflop_per_image": gflops, "ops": [
            {"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in ka[:top]]}
    kd = out["runs"]["kd"]
    for v in out["runs"].values():
        v["ratio_to_kd"] = v["ms_per_step"] / kd["ms_per_step"]
        v["flop_ratio_to_kd"] = v["gflop_per_image"] / kd["gflop_per_image"]
    return out


def format_profile(r: dict) -> str:
    lines = [f"profile: teacher {r['teacher']} -> student {r['student']}, {r['size']} px, batch {r['batch_size']}, "
             f"{r['steps']} training steps per method under torch.profiler (its overhead included), CPU, "
             f"channels_last, torch threads {r['threads']}"]
    for label, v in r["runs"].items():
        lines.append(f"{label}: {v['ms_per_step']:.2f} ms per step, {v['ratio_to_kd']:.2f}x KD; "
                     f"{v['gflop_per_image']:.4f} GFLOP per image, {v['flop_ratio_to_kd']:.2f}x KD's")
        for o in v["ops"]:
            lines.append(f"    {o['op']:42s} {o['calls_per_step']:6.1f} calls {o['self_ms_per_step']:8.2f} ms "
                         f"{100 * o['share']:5.1f} %")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--teacher-arch", default="cnn_small")
    ap.add_argument("--student", default="cnn_small")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--profile", action="store_true", help="profile training steps op by op instead")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--profile-options", nargs="*", default=[], metavar="KEY[=JSON]",
                    help="also profile KD³ with these distill.kd3 options (e.g. teacher_contrastive fused_views)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.profile:
        r = profile_steps(a.teacher_arch, a.student, a.size, a.batch_size, a.profile_steps, a.profile_options,
                          threads=a.threads)
        print(format_profile(r))
        if a.json:
            atomic_write_json(a.json, r)
        return 0
    r = run_bench(a.n, a.size, a.teacher_arch, a.student, a.epochs, a.batch_size, a.device, a.workers,
                  a.teacher_epochs, a.threads)
    print(format_report(r))
    if a.json:
        atomic_write_json(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
