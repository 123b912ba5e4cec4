"""Curate benchmarks (numbers for docs/BENCHMARKS.md; no assertions).

(a) ``throughput``: curate's decode+hash+embed pass vs the raw embedding throughput of the same
    open_clip model in the same process (pre-decoded tensors, model only). Ratio = overhead of
    everything around the model. Random weights (no download) have the real model's cost.
    ``CuratePair`` is the same pair for ``bench/throughput.py``'s interleaved repeats.
(b) ``neardup``: semantic near-duplicate removal on N clustered random unit vectors with planted
    near-duplicates (cosine ~0.98): kd3's method and the alternatives it was chosen over, each in a
    fresh process, as a table of time, recall of the planted pairs, false pairs, peak RSS.

    .venv/bin/python bench/curate_bench.py                      # both, small sizes
    .venv/bin/python bench/curate_bench.py neardup --n 1000000  # the 1M case, every method
    .venv/bin/python bench/curate_bench.py neardup --n 1000000 --methods cells ivf-range
    .venv/bin/python bench/curate_bench.py throughput --model ViT-B-32 --images 256 --px 800 2000
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_timed, machine, photo_jpegs  # noqa: E402


class CuratePair:
    """A (raw model, curate pass) pair on the same JPEGs and the same open_clip model, for interleaved
    timing. ``raw()``: the model alone on pre-decoded tensors (same batches). ``curate()``: curate's
    decode+hash+embed pass (the stage's ``scan``) in a fresh run directory (a rerun would skip the work).
    Both return (wall seconds, process CPU seconds) per image. ``decode()``: thread CPU seconds per image
    of the scan's per-file work (read, decode, validate, pHash + thumbnail, model input) on one thread.
    Random weights (no download) have the real model's cost."""

    def __init__(self, workdir: Path, model: str = "ViT-B-32", n_images: int = 128, batch_size: int = 32,
                 workers: int = 2, device: str = "auto", px: tuple[int, int] = (800, 2000)):
        import hashlib

        import torch
        from PIL import Image

        from pipeline.curate.embed import ClipEmbedder

        self.workdir, self.model, self.n, self.batch, self.workers, self.device = (
            Path(workdir), model, n_images, batch_size, workers, device)
        self.px = px
        datas = photo_jpegs(n_images, px)
        self.template = self.workdir / "crawl"
        rows, self.files = [], []
        for i, data in enumerate(datas):
            sha = hashlib.sha256(data).hexdigest()
            rel = f"crawl/images/{sha[:2]}/{sha}.jpg"
            (self.workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / rel).write_bytes(data)
            self.files.append((sha, self.workdir / rel))
            rows.append({"class": ["a", "b"][i % 2], "query": "", "engine": "bench", "url": f"http://x/{i}.jpg",
                         "status": "ok", "error": None, "sha256": sha, "bytes": len(data), "w": 0, "h": 0,
                         "path": rel, "time": 0})
        (self.template / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.mean_kb = sum(map(len, datas)) / len(datas) / 1024
        self.emb = ClipEmbedder(model, None, None, device)
        self.xs = [self.emb.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        self.emb.embed(torch.stack(self.xs[:batch_size]))  # warm-up
        self.k = 0
        self.last_stage_s = None

    def raw(self) -> tuple[float, float]:
        import torch

        def run():
            for i in range(0, len(self.xs), self.batch):
                self.emb.embed(torch.stack(self.xs[i:i + self.batch]))
            if self.emb.device.startswith("cuda"):
                torch.cuda.synchronize()

        wall, cpu, _ = cpu_timed(run)
        return wall / self.n, cpu / self.n

    def curate(self) -> tuple[float, float]:
        import shutil

        import pipeline.curate.stage as stage
        from pipeline.core.config import load_config

        self.k += 1
        run = self.workdir / "runs" / f"bench{self.k}"
        shutil.copytree(self.template, run / "crawl")
        cfg = load_config(None, {"name": run.name, "runs_root": str(run.parent), "classes": ["a", "b"],
                                 "curate.clip_model": self.model, "curate.clip_pretrained": None,
                                 "curate.batch_size": self.batch, "curate.workers": self.workers,
                                 "curate.device": self.device, "curate.near_dup": False})
        scan, took = stage.run_scan, []

        def timed_scan(*a, **kw):
            wall, cpu, out = cpu_timed(lambda: scan(*a, **kw))
            took.append((wall, cpu, out))
            return out

        stage.run_scan = timed_scan
        try:
            t0 = time.perf_counter()
            stage.curate(cfg)
            self.last_stage_s = time.perf_counter() - t0
        finally:
            stage.run_scan = scan
        shutil.rmtree(run, ignore_errors=True)
        (wall, cpu, _), = took
        return wall / self.n, cpu / self.n

    def decode(self) -> float:
        """Thread CPU seconds per image of the scan's per-file work, one thread, no model."""
        from pipeline.curate.scan import _worker

        work = _worker(self.emb, 89_478_485)
        t = time.thread_time()
        for item in self.files:
            work(item)
        return (time.thread_time() - t) / self.n

    def describe(self) -> str:
        return (f"open_clip {self.model} (random weights = the real model's cost), {self.n} JPEGs of "
                f"{self.px[0]}-{self.px[1]} px (mean {self.mean_kb:.0f} KiB), batch {self.batch}, "
                f"{self.workers} decode threads, device {self.emb.device}")


def throughput(model: str = "ViT-B-32", n_images: int = 256, batch_size: int = 32, workers: int = 2,
               device: str = "auto", px: tuple[int, int] = (320, 640)) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pair = CuratePair(Path(tmp), model, n_images, batch_size, workers, device, px)
        raw_s = pair.raw()[0]
        scan_s = pair.curate()[0]
        stage_s = pair.last_stage_s
    return {"model": model, "device": device, "images": n_images, "px": f"{px[0]}-{px[1]}", "batch": batch_size,
            "workers": workers, "raw_img_s": round(1 / raw_s, 1), "curate_embed_pass_img_s": round(1 / scan_s, 1),
            "overhead_pct": round(100 * (scan_s / raw_s - 1), 1),
            "curate_stage_total_img_s": round(n_images / stage_s, 1), "stage_s": round(stage_s, 2)}


def planted_embeddings(n: int, d: int = 512, dup_frac: float = 0.05, n_clusters: int = 2000, spread: float = 0.022,
                       noise: float = 0.009, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors: clustered 'images' (same-cluster cosine ~0.8) + planted near copies (cos ~0.98).
    Returns (emb [n, d], src) where row n - len(src) + k is a near copy of row src[k]."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_frac)
    n_base = n - n_dup
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n_base, step):
        e = min(n_base, s + step)
        x = centres[rng.integers(0, n_clusters, e - s)] + spread * rng.standard_normal((e - s, d)).astype(np.float32)
        emb[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n_base, n_dup, replace=False)
    for s in range(0, n_dup, step):
        e = min(n_dup, s + step)
        x = emb[src[s:e]] + noise * rng.standard_normal((e - s, d)).astype(np.float32)
        emb[n_base + s:n_base + e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return emb, src


# ------------------------------------------------------------------ near-dup alternatives
# Each method maps (emb, threshold) -> (rows, cols) pairs. "cells" is kd3's pipeline.curate.neardup; the others
# are the alternatives it was measured against (issue 14). Methods whose coarse pass is approximate in
# the similarity itself (8-bit codes) re-check candidates exactly with pipeline.curate.neardup.recheck.
def _ivf_range(emb, thr, *, nlist=None, nprobe=4, sq8=False, hnsw_quantizer=True, slack=0.0, batch=16384):
    """FAISS IVF range search (kd3 <= 0.1: IVFFlat, ~4 sqrt(N) lists, HNSW quantizer, nprobe 4)."""
    import math

    import faiss

    from pipeline.curate.neardup import recheck

    n, d = emb.shape
    nlist = nlist or max(16, int(4 * math.sqrt(n)))
    quantizer = (faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if hnsw_quantizer and nlist > 1024
                 else faiss.IndexFlatIP(d))
    if sq8:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 32
    rng = np.random.default_rng(0)
    index.train(emb[np.sort(rng.choice(n, size=min(n, 32 * nlist), replace=False))])
    index.nprobe = nprobe
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(32, 2 * nprobe)
    rows, cols = _range_pairs(index, emb, thr - slack, batch)
    return recheck(emb, rows, cols, thr) if slack else (rows, cols)


def _hnsw_knn(emb, thr, *, k=16, m=32, ef_construction=40, ef_search=64):
    """kNN graph (k nearest by HNSW) thresholded at the cosine cut."""
    import faiss

    index = faiss.IndexHNSWFlat(emb.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(emb)
    index.hnsw.efSearch = ef_search
    sims, idx = index.search(emb, k)
    qi = np.repeat(np.arange(len(emb), dtype=np.int64), k).reshape(-1, k)
    ok = (sims >= np.float32(thr)) & (idx >= 0) & (idx != qi)
    a, b = qi[ok], idx[ok].astype(np.int64)
    key = np.unique(np.minimum(a, b) * len(emb) + np.maximum(a, b))
    return key // len(emb), key % len(emb)


def _cells(emb, thr, **kw):
    from pipeline.curate.neardup import similar_pairs

    return similar_pairs(emb, thr, exact_max=0, **kw)


def _exact(emb, thr):
    from pipeline.curate.neardup import similar_pairs

    return similar_pairs(emb, thr, exact_max=len(emb))


def _flat_range(emb, thr, batch=16384):
    """faiss IndexFlatIP range search (kd3 <= 0.1's exact path)."""
    import faiss

    return _range_pairs(faiss.IndexFlatIP(emb.shape[1]), emb, thr, batch)


def _range_pairs(index, emb, thr, batch):
    """Add ``emb`` to the faiss index and range-search it against itself: pairs i < j with sim >= thr."""
    index.add(emb)
    radius = float(np.nextafter(np.float32(thr), np.float32(-1)))  # faiss keeps sim > radius
    rows, cols = [], []
    for start in range(0, len(emb), batch):
        lims, _, idx = index.range_search(emb[start:start + batch], radius)
        qi = np.repeat(np.arange(start, start + min(batch, len(emb) - start), dtype=np.int64),
                       np.diff(lims).astype(np.int64))
        keep = idx > qi
        rows.append(qi[keep])
        cols.append(idx[keep].astype(np.int64))
    return np.concatenate(rows), np.concatenate(cols)


NEARDUP_METHODS = {
    "cells": (_cells, {}, "kd3: blocked GEMM in k-means cells (PCA-64, 2 sqrt(N) cells, 2 probes) + exact re-check"),
    "cells-1probe": (_cells, {"nprobe": 1}, "as cells, each row probes its own cell only"),
    "cells-4sqrtN": (_cells, {"nprobe": 2, "nlist_per_sqrt_n": 4}, "as cells with 4 sqrt(N) cells"),
    "ivf-range": (_ivf_range, {}, "kd3 <= 0.1: faiss IVFFlat range search, 4 sqrt(N) lists, HNSW quantizer, nprobe 4"),
    "ivf-range-p2": (_ivf_range, {"nprobe": 2, "nlist_per_sqrt_n": 2},
                     "faiss IVFFlat range search, 2 sqrt(N) lists, nprobe 2"),
    "ivfsq8-range": (_ivf_range, {"nprobe": 2, "nlist_per_sqrt_n": 2, "sq8": True, "slack": 0.02},
                     "faiss IVF + 8-bit SQ codes, range at thr-0.02, exact re-check"),
    "hnsw-knn16": (_hnsw_knn, {}, "faiss HNSW (M 32, efC 40, efS 64) kNN graph, k=16, thresholded"),
    # quadratic: only for small N (the default list leaves them out above EXACT_N)
    "exact": (_exact, {}, "kd3 for N <= 50k: every pair by tiled GEMM + exact re-check"),
    "flat-range": (_flat_range, {}, "kd3 <= 0.1 for N <= 50k: faiss IndexFlatIP range search"),
}
EXACT_N = 100_000


def _peak_rss_gib() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's RSS at fork time)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _run_method(name: str, emb_path: str, thr: float, out: str) -> dict:
    """One method in this (fresh) process: its peak RSS is the method's plus the embeddings'."""
    import faiss

    from pipeline.curate.neardup import default_workers

    faiss.omp_set_num_threads(default_workers())
    emb = np.load(emb_path)
    rss0 = _peak_rss_gib()
    fn, kw, _ = NEARDUP_METHODS[name]
    kw = dict(kw)
    per = kw.pop("nlist_per_sqrt_n", None)
    if per:
        kw["nlist"] = int(per * np.sqrt(len(emb)))
    t0 = time.perf_counter()
    rows, cols = fn(emb, thr, **kw)
    t = time.perf_counter() - t0
    np.savez(out, rows=rows, cols=cols)
    return {"s": t, "peak_rss_gib": _peak_rss_gib(),
            "emb_loaded_rss_gib": rss0, "load": os.getloadavg()[0]}


def neardup(n: int = 100_000, d: int = 512, threshold: float = 0.95, methods: list[str] | None = None,
            timeout: float = 900) -> list[dict]:
    """Each method in its own process on the same planted embeddings: time (pairs only; components
    add ~1 s at 1M), recall of the planted pairs, false pairs (found, exact cosine < threshold),
    pairs found beyond the planted ones, peak RSS."""
    import subprocess

    from pipeline.curate.neardup import group_labels

    emb, src = planted_embeddings(n, d)
    n_base = n - len(src)
    dup = n_base + np.arange(len(src))
    planted_cos = float(np.mean(np.sum(emb[src[:1000]] * emb[dup[:1000]], 1)))
    out = []
    with tempfile.TemporaryDirectory(prefix="kd3-neardup-") as tmp:
        np.save(Path(tmp) / "emb.npy", emb)
        default = [m for m in NEARDUP_METHODS if n <= EXACT_N or m not in ("exact", "flat-range")]
        for name in methods or default:
            res = Path(tmp) / f"{name}.npz"
            cmd = [sys.executable, __file__, "_neardup_one", name, str(Path(tmp) / "emb.npy"), str(threshold), str(res)]
            row = {"n": n, "method": name, "s": None, "recall": None, "false_pairs": None, "extra_pairs": None,
                   "peak_rss_gib": None, "emb_gib": round(emb.nbytes / 2**30, 2)}
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                row["s"] = f">{timeout:.0f} (stopped)"
                out.append(row)
                print(json.dumps(row), flush=True)
                continue
            if p.returncode != 0:
                row["s"] = f"failed: {p.stderr.strip().splitlines()[-1:]}"
                out.append(row)
                continue
            stat = json.loads(p.stdout.strip().splitlines()[-1])
            z = np.load(res)
            rows, cols = z["rows"], z["cols"]
            labels = group_labels(n, rows, cols)
            cos = np.einsum("ij,ij->i", emb[rows].astype(np.float64), emb[cols].astype(np.float64))
            planted = set(zip(src.tolist(), dup.tolist()))
            row.update(s=round(stat["s"], 1), recall=round(float(np.mean(labels[src] == labels[dup])), 5),
                       false_pairs=int(np.sum(cos < np.float32(threshold))),
                       extra_pairs=int(sum(1 for a, b in zip(rows.tolist(), cols.tolist()) if (a, b) not in planted)),
                       peak_rss_gib=round(stat["peak_rss_gib"], 2), load1=round(stat["load"], 2))
            out.append(row)
            print(json.dumps(row), flush=True)
    for r in out:
        r.update(planted=len(src), planted_cos=round(planted_cos, 3), threshold=threshold)
    return out


def _table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for k in rows[0]:
        t.add_column(k)
    for r in rows:
        t.add_row(*[str(v) for v in r.values()])
    Console(width=240).print(t)
    for r in rows:
        print(json.dumps(r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "throughput", "neardup"])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--px", type=int, nargs=2, default=[320, 640], help="JPEG longer side range (throughput)")
    p.add_argument("--n", type=int, nargs="*", default=[100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--methods", nargs="*", choices=sorted(NEARDUP_METHODS),
                   help="near-dup methods to compare (default: all)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per near-dup method before it is stopped")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_neardup_one"]:  # internal: one method in a fresh process (peak RSS)
        name, emb_path, thr, out = argv[1:5]
        print(json.dumps(_run_method(name, emb_path, float(thr), out)))
        return 0
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.what in ("all", "throughput"):
        _table("curate throughput vs raw model", [throughput(a.model, a.images, a.batch, a.workers, a.device, tuple(a.px))])
    if a.what in ("all", "neardup"):
        for n in a.n:
            print(f"machine: {machine()}", flush=True)
            _table(f"near-duplicate removal, {n} x {a.dim} planted embeddings",
                   neardup(n, a.dim, methods=a.methods, timeout=a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
