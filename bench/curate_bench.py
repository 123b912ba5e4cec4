"""Curate benchmarks (numbers for the README; no assertions).

(a) ``throughput``: curate's decode+hash+embed pass vs the raw embedding throughput of the same
    open_clip model in the same process (pre-decoded tensors, model only). Ratio = overhead of
    everything around the model. Random weights (no download) have the real model's cost.
(b) ``neardup``: semantic near-duplicate removal time on N clustered random unit vectors with
    planted near-duplicates (cosine ~0.98), and the recall of the planted pairs.

    .venv/bin/python bench/curate_bench.py                      # both, small sizes
    .venv/bin/python bench/curate_bench.py neardup --n 1000000  # the 1M case
    .venv/bin/python bench/curate_bench.py throughput --model ViT-B-32 --images 256
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


def _images(n: int, seed: int = 0) -> list[bytes]:
    """n distinct JPEGs (random crops / sizes of real sample images)."""
    import skimage.data as d
    from PIL import Image
    from sklearn.datasets import load_sample_images

    srcs = [Image.fromarray(a) for a in load_sample_images().images]
    srcs += [Image.fromarray(getattr(d, k)()) for k in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = srcs[i % len(srcs)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        side = int(rng.integers(320, 640))
        crop = im.crop((x, y, x + cw, y + ch))
        crop = crop.resize((side, max(32, int(side * ch / cw))))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def throughput(model: str = "ViT-B-32", n_images: int = 256, batch_size: int = 32, workers: int = 2,
               device: str = "auto") -> dict:
    import hashlib

    import torch

    from pipeline.core.config import load_config
    from pipeline.curate import curate
    from pipeline.curate.embed import ClipEmbedder
    from PIL import Image

    datas = _images(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "bench"
        rows = []
        for i, data in enumerate(datas):
            sha = hashlib.sha256(data).hexdigest()
            rel = f"crawl/images/{sha[:2]}/{sha}.jpg"
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_bytes(data)
            rows.append({"class": ["a", "b"][i % 2], "query": "", "engine": "bench", "url": f"http://x/{i}.jpg",
                         "status": "ok", "error": None, "sha256": sha, "bytes": len(data), "w": 0, "h": 0,
                         "path": rel, "time": 0})
        (run / "crawl" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = load_config(None, {"name": "bench", "runs_root": str(run.parent), "classes": ["a", "b"],
                                 "curate.clip_model": model, "curate.clip_pretrained": None,
                                 "curate.batch_size": batch_size, "curate.workers": workers,
                                 "curate.device": device})
        # raw model throughput on pre-decoded tensors (same model, same batches)
        emb = ClipEmbedder(model, None, None, device)
        xs = [emb.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        emb.embed(torch.stack(xs[:batch_size]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(xs), batch_size):
            emb.embed(torch.stack(xs[i:i + batch_size]))
        if emb.device.startswith("cuda"):
            torch.cuda.synchronize()
        raw_s = time.perf_counter() - t0
        del xs, emb
        t0 = time.perf_counter()
        m = curate(cfg)
        stage_s = time.perf_counter() - t0
        scan_s = m["stats"]["embed"]["wall_s"]
    raw = n_images / raw_s
    scan = n_images / scan_s
    return {"model": model, "device": device, "images": n_images, "batch": batch_size, "workers": workers,
            "raw_img_s": round(raw, 1), "curate_embed_pass_img_s": round(scan, 1),
            "overhead_pct": round(100 * (raw / scan - 1), 1),
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


def neardup(n: int = 100_000, d: int = 512, threshold: float = 0.95, nprobe: int = 4) -> dict:
    import faiss

    from pipeline.curate.neardup import group_labels, similar_pairs

    emb, src = planted_embeddings(n, d)
    n_base = n - len(src)
    pair_cos = float(np.mean(np.sum(emb[src[:1000]] * emb[n_base:n_base + 1000], 1)))
    t0 = time.perf_counter()
    rows, cols = similar_pairs(emb, threshold, nprobe=nprobe)
    t_pairs = time.perf_counter() - t0
    labels = group_labels(n, rows, cols)
    total = time.perf_counter() - t0
    recall = float(np.mean(labels[src] == labels[n_base + np.arange(len(src))]))
    planted_set = set(zip(src.tolist(), (n_base + np.arange(len(src))).tolist()))
    extra = sum(1 for a, b in zip(rows.tolist(), cols.tolist()) if (a, b) not in planted_set)
    return {"n": n, "dim": d, "threshold": threshold, "method": "flat" if n <= 50_000 else f"ivf nprobe={nprobe}",
            "planted": len(src), "planted_cos": round(pair_cos, 3), "pairs_found": int(len(rows)),
            "non_planted_pairs": int(extra), "recall": round(recall, 4), "pairs_s": round(t_pairs, 1),
            "total_s": round(total, 1), "threads": faiss.omp_get_max_threads()}


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
    p.add_argument("--n", type=int, nargs="*", default=[100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--nprobe", type=int, default=4)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.what in ("all", "throughput"):
        _table("curate throughput vs raw model", [throughput(a.model, a.images, a.batch, a.workers, a.device)])
    if a.what in ("all", "neardup"):
        _table("near-duplicate removal", [neardup(n, a.dim, nprobe=a.nprobe) for n in a.n])
    return 0


if __name__ == "__main__":
    sys.exit(main())
