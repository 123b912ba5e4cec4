"""Loader bench: can the CPU feed a GPU? (numbers for docs/BENCHMARKS.md; no assertions)

Webdataset shards written by curate's own shard writer (``pipeline.curate.shards.write_shards``: JPEG q95,
longer side <= 512) are read through kd3's distill data path exactly as training reads them
(``distill.data.open_web_data`` -> ``WebPool`` random access -> the trainer's ``_loader``: shuffled
subset, ``rrc_flip`` augmentation, normalisation, ``collate_indexed``) with 1 and 2 worker processes,
interleaved w1, w2, w1, w2, ... Printed: images/s per worker process (steady state, and per epoch with
the worker start-up the trainer pays each epoch), for 32 px pools (the release recipe: ImageNet 32x32
images) and 224 px pools (web photos of 256-512 px cropped to 224).

Then: the CPU cores needed to keep one H100 busy on the release recipe (ResNet-34 -> ResNet-18, 32 px,
batch 1024, KD³). No GPU here, so the H100's training throughput is an ESTIMATE from the FLOPs of one
KD³ step counted with ``torch.utils.flop_counter.FlopCounterMode`` on the real models and method
(student fwd+bwd on x and on its MixDistribution copy, teacher fwd on both, heads, plus the per-epoch
selection forward of teacher and student on every image) and an assumed sustained bf16 throughput
(default 40 % of the H100 SXM's 989 TFLOP/s dense bf16). Replace it with a measured number when a GPU
is lent: ``python bench/distill_bench.py --device cuda --teacher-arch resnet34 --student resnet18 ...``
then ``--gpu-img-s <measured train img/s>``.

    python bench/loader_bench.py                         # 32 px and 224 px, 1 and 2 workers, 3 repeats
    python bench/loader_bench.py --sizes 32 --repeats 5 --gpu-img-s 30000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchlib import format_machine, machine, photo_jpegs, quiet_logging  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------ a pool, written the way curate writes it
def make_pool(root: Path, n: int, size: int, seed: int = 0, classes: int = 10) -> Path:
    """n photo crops -> raw files -> ``pipeline.curate.shards.write_shards`` -> manifest. ``size`` 32: 32x32
    images (ImageNet-32-like); otherwise longer side 256-512 (web photos after curate's max_side)."""
    from pipeline.core.records import build_manifest, write_manifest
    from pipeline.curate.shards import Sample, write_shards

    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    samples = []
    datas = photo_jpegs(n, (size, size) if size <= 64 else (256, 512), seed, square=size <= 64, quality=95)
    for i, data in enumerate(datas):
        p = raw / f"{i:07d}.jpg"
        p.write_bytes(data)
        label = i % classes
        samples.append(Sample(key=f"{i:016x}", meta={"class": f"c{label}", "label": label}, label=label,
                              src=p, ext=".jpg"))
    shardlist, _, _ = write_shards(samples, root / "shards", "bench", root / "shards_state.json",
                                   image_format="jpg", max_side=512, jpeg_quality=95, max_pixels=10**8,
                                   max_samples=10_000, max_bytes=10**9, workers=2)
    man = build_manifest(name="bench", shardlist=shardlist, classes=[f"c{k}" for k in range(classes)],
                         class_counts={}, stats={}, embedding={}, thresholds={}, config_hash="bench")
    return write_manifest(root / "manifest.json", man)


# ------------------------------------------------------------------ the distill data path
def loader_epoch(manifest: Path, size: int, workers: int, batch: int, max_images: int, seed: int = 0) -> dict:
    """One pass as the trainer makes it: shuffled subset of the pool through ``_loader``.

    The first ``workers * prefetch_factor + 1`` batches may have been made while the loader started
    (the workers run ahead), so the steady-state rate is taken over the batches after them, when the
    consumer (as fast as a GPU would be) waits on every batch. Also returned: the time to the first
    batch (worker start-up, paid every epoch: the trainer does not keep workers) and the whole pass's rate."""
    from distill.data import collate_indexed, open_web_data
    from distill.runtime import Runtime, loader as _loader

    data = open_web_data(manifest, size, CIFAR_MEAN, CIFAR_STD, "rrc_flip")
    pool = data.pool
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g)[:max_images].tolist()
    loader = _loader(torch.utils.data.Subset(pool, order), batch, workers, Runtime("cpu"))
    loader.collate_fn = collate_indexed
    skip = workers * (loader.prefetch_factor or 0) + 1
    if len(loader) < 3 * skip:
        raise ValueError(f"{len(loader)} batches are too few to measure {workers} workers: use a larger pool "
                         f"or smaller batch (need {3 * skip})")
    t0 = time.perf_counter()
    stamps, n = [], []
    for x, _ in loader:
        assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
        stamps.append(time.perf_counter())
        n.append(x.shape[0])
    steady = sum(n[skip:]) / (stamps[-1] - stamps[skip - 1])
    return {"first_batch_s": stamps[0] - t0, "steady_img_s": steady,
            "epoch_img_s": len(order) / (stamps[-1] - t0), "images": len(order), "batches": len(n)}


def loader_table(sizes: list[int], workers: list[int], repeats: int, pool_n: dict[int, int],
                 batch: dict[int, int], workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        root = workdir / f"pool{size}"
        t = time.perf_counter()
        manifest = make_pool(root, pool_n[size], size)
        print(f"  pool {size} px: {pool_n[size]} images, "
              f"{sum(p.stat().st_size for p in (root / 'shards').glob('*.tar')) / 2**20:.1f} MiB of shards, "
              f"written in {time.perf_counter() - t:.0f} s", flush=True)
        res: dict[int, list[dict]] = {w: [] for w in workers}
        for _ in range(repeats):  # interleaved: w1, w2, w1, w2, ...
            for w in workers:
                res[w].append(loader_epoch(manifest, size, w, batch[size], pool_n[size]))
        for w in workers:
            steady = statistics.median(r["steady_img_s"] for r in res[w])
            rows.append({"size": size, "batch": batch[size], "workers": w,
                         "img_s": round(steady, 1),
                         "img_s_per_worker": round(steady / max(1, w), 1),
                         "spread": f"{min(r['steady_img_s'] for r in res[w]):.0f}..{max(r['steady_img_s'] for r in res[w]):.0f}",
                         "epoch_img_s_incl_startup": round(statistics.median(r["epoch_img_s"] for r in res[w]), 1),
                         "first_batch_s": round(statistics.median(r["first_batch_s"] for r in res[w]), 2),
                         "images": res[w][0]["images"], "repeats": repeats})
    return rows


# ------------------------------------------------------------------ the GPU side: FLOPs of one step
def step_flops(teacher_arch: str = "resnet34", student_arch: str = "resnet18", size: int = 32,
               num_classes: int = 100, batch: int = 8) -> dict:
    """FLOPs per image (FlopCounterMode: 2 per multiply-add) of: a KD³ training step (the real
    ``KD3.forward`` + backward, release switches), a KD step, and the selection forward (teacher and
    student, the worst case: both run while 0 < alpha < 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    from distill.methods import create_method
    from distill.models import create_model
    from pipeline.core.config import DistillConfig

    torch.manual_seed(0)
    teacher = create_model(teacher_arch, num_classes).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, size, size)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / batch

    out = {}
    for name in ("kd3", "kd"):
        student = create_model(student_arch, num_classes)
        method = create_method(name, student, teacher, DistillConfig(method=name).method_config(), num_classes,
                               student_arch=student_arch).train()

        def train_step():
            losses = method(x)
            total = sum(method.loss_weights.get(k, 1.0) * v for k, v in losses.items())
            total.backward()

        out[f"{name}_step"] = count(train_step)
        if name == "kd3":
            method.eval()

            def select():
                with torch.no_grad():
                    teacher(x)
                    method.student_logits(x)

            out["kd3_select"] = count(select)
    out["kd3_per_trained_image"] = out["kd3_step"] + out["kd3_select"]
    return out


def gpu_estimate(flops: dict, tflops: float = H100_BF16_DENSE_TFLOPS, utilisation: float = 0.40) -> dict:
    sustained = tflops * 1e12 * utilisation
    return {"assumed_sustained_tflops": tflops * utilisation,
            "kd3_img_s": sustained / flops["kd3_per_trained_image"], "kd_img_s": sustained / flops["kd_step"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 224])
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="loader worker processes (0: in the main process)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n32", type=int, default=12288, help="images in the 32 px pool")
    ap.add_argument("--n224", type=int, default=1536, help="images in the 224 px pool")
    ap.add_argument("--batch32", type=int, default=256,
                    help="loader batch for 32 px (the recipe's 1024 would leave too few batches to time; "
                         "per-image cost does not depend on it beyond the collate copy)")
    ap.add_argument("--batch224", type=int, default=32)
    ap.add_argument("--utilisation", type=float, default=0.40,
                    help="assumed sustained fraction of the H100's 989 TFLOP/s dense bf16")
    ap.add_argument("--gpu-img-s", type=float, default=None,
                    help="measured KD³ training img/s on the GPU (replaces the FLOP estimate)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    quiet_logging()
    print(f"machine: {format_machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kd3-loader-bench-") as tmp:
        rows = loader_table(a.sizes, a.workers, a.repeats, {32: a.n32, 224: a.n224},
                            {32: a.batch32, 224: a.batch224}, Path(tmp))
    print("\nloader: shard -> decoded, rrc_flip-augmented, normalised batch (distill.data + trainer._loader)")
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))

    flops = step_flops()
    est = gpu_estimate(flops, utilisation=a.utilisation)
    gpu = a.gpu_img_s or est["kd3_img_s"]
    print(f"\nrelease recipe: resnet34 -> resnet18, 32 px, batch 1024, KD³ (FlopCounterMode, per image): "
          f"step {flops['kd3_step'] / 1e9:.2f} GFLOP + selection forward {flops['kd3_select'] / 1e9:.2f} GFLOP "
          f"= {flops['kd3_per_trained_image'] / 1e9:.2f} GFLOP per trained image (KD step: {flops['kd_step'] / 1e9:.2f})")
    if a.gpu_img_s:
        print(f"H100 KD³ training throughput: {gpu:.0f} img/s (measured, given with --gpu-img-s)")
    else:
        print(f"H100 KD³ training throughput: ESTIMATE {gpu:.0f} img/s, assuming {est['assumed_sustained_tflops']:.0f} "
              f"TFLOP/s sustained bf16 = {100 * a.utilisation:.0f}% of {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s dense "
              f"(KD: {est['kd_img_s']:.0f} img/s)")
    out_rows = []
    for r in rows:
        if r["size"] != 32:
            continue
        cores = gpu / r["img_s_per_worker"]
        out_rows.append({"workers_measured": r["workers"], "img_s_per_worker": r["img_s_per_worker"],
                         "cores_to_feed_one_h100": round(cores, 1)})
        who = f"{r['workers']} worker process(es)" if r["workers"] else "in the main process (no workers)"
        print(f"  32 px loader, {who}: {r['img_s_per_worker']:.0f} img/s per process "
              f"-> {cores:.1f} CPU cores (one worker each) to keep one H100 busy"
              + ("" if a.gpu_img_s else " (estimate)"))
    print(f"machine at the end: {format_machine()}")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "loader": rows, "flops": flops, "gpu_img_s": gpu,
                                      "gpu_img_s_is_estimate": not a.gpu_img_s, "cores": out_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
