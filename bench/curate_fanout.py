"""Curate across machines: the curate flow with its scan on a Dask LocalCluster of 1 vs 2 worker processes,
on a pool of 32-px images (mixed content: handwritten digits, photo crops, flat colours, each with noise;
about 2 % exact or re-encoded copies) read as a folder source, teacher backend (a random-weight cnn_tiny
teacher: the scan's cost does not depend on the weights). Prints seconds per 1,000 images for the scan
(the chunk tasks) and for the whole flow (cluster start, scan, reduce), and the 1-to-2-worker ratio.

    .venv/bin/python bench/curate_fanout.py                  # 50,000 images, workers 1 then 2, once each
    .venv/bin/python bench/curate_fanout.py --n 20000 --repeats 2 --json /tmp/fanout.json

The pool is written once under --out (default: a temporary folder) and reused by every run; each run
curates into a fresh run directory, so nothing is cached.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = [f"c{i}" for i in range(10)]


def _sources(rng):
    """Base 32-px RGB images: digits (sklearn), crops of the scikit-image photos, flat colours."""
    import numpy as np
    import skimage.data as d
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images
    photos = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.hubble_deep_field(), d.immunohistochemistry()]

    def make(k: int):
        kind = k % 3
        if kind == 0:  # a digit, tinted, scaled and shifted
            g = (digits[rng.integers(len(digits))] * 16).clip(0, 255).astype(np.uint8)
            tint = rng.integers(80, 256, 3)
            a = (g[..., None] / 255.0 * tint).astype(np.uint8)
            side = int(rng.integers(24, 41))
            im = Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 60, 3)))
            im.paste(Image.fromarray(a).resize((side, side), Image.BICUBIC),
                     (int(rng.integers(-4, 37 - side)), int(rng.integers(-4, 37 - side))))
        elif kind == 1:  # a crop of a photo
            p = photos[rng.integers(len(photos))]
            s = int(rng.integers(48, 160))
            y, x = rng.integers(0, p.shape[0] - s), rng.integers(0, p.shape[1] - s)
            im = Image.fromarray(p[y:y + s, x:x + s]).resize((32, 32), Image.BILINEAR)
        else:  # smooth colour blobs: a random 4x4 colour grid, upsampled
            im = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        a = np.asarray(im, np.int16) + rng.integers(-12, 13, (32, 32, 3))  # every image distinct
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))

    return make


def make_pool(root: Path, n: int, dup_share: float = 0.02, seed: int = 0) -> Path:
    """``n`` files under ``root/<class>/``: distinct images, then half the copies exact, half re-encoded
    (JPEG 75, some resized to 40 px) and filed under a random class."""
    import numpy as np
    from PIL import Image

    done = root / f".done-{n}-{seed}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    make = _sources(rng)
    n_dup = int(n * dup_share)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    originals = []
    for k in range(n - n_dup):
        p = root / CLASSES[k % len(CLASSES)] / f"{k:06d}.png"
        make(k).save(p)
        originals.append(p)
    for j in range(n_dup):
        src = originals[int(rng.integers(len(originals)))]
        dest = root / CLASSES[int(rng.integers(len(CLASSES)))] / f"copy{j:05d}"
        if j % 2 == 0:
            dest.with_suffix(".png").write_bytes(src.read_bytes())
        else:
            im = Image.open(src).convert("RGB")
            if j % 4 == 1:
                im = im.resize((40, 40), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75)
            dest.with_suffix(".jpg").write_bytes(buf.getvalue())
    done.write_text("ok\n")
    return root


def make_teacher(path: Path) -> Path:
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    if not path.exists():
        torch.manual_seed(0)
        net = create_model("cnn_tiny", len(CLASSES))
        save_checkpoint(path, "cnn_tiny", CLASSES, 32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], net.state_dict())
    return path


def run_once(work: Path, pool: Path, teacher: Path, workers: int, tag: str, a) -> dict:
    from flows.stages import curate as curate_flow
    from pipeline.core.config import load_config
    from pipeline.core.io import sha256_file

    root = work / "runs" / tag
    cfg = load_config(None, {
        "name": "fanout", "runs_root": str(root), "classes": CLASSES, "teacher": str(teacher),
        "crawl.sources": ["folder"], "crawl.folder": str(pool), "curate.embed_backend": "teacher",
        "curate.device": "cpu", "curate.workers": a.decode_threads, "curate.batch_size": 256,
        "curate.scan_chunk": a.chunk, "curate.near_dup_threshold": 0.9999, "curate.max_dup_share": 1.0,
        "flow.task_runner": "dask", "flow.dask_workers": workers, "flow.dask_processes": True, "flow.cache": False,
    })
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run directory: nothing cached
    Path(cfg.run_dir).mkdir(parents=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = curate_flow(cfg)
    total = time.perf_counter() - t0
    emb = r["stats"]["embed"]
    n = emb["in"]
    return {"workers": workers, "images": n, "chunks": emb.get("chunks"), "scan_s": emb.get("wall_s"),
            "total_s": round(total, 1), "scan_s_per_1k": round(1000 * emb["wall_s"] / n, 3),
            "total_s_per_1k": round(1000 * total / n, 3), "kept": r["nsamples"],
            "load_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "decisions_sha256": sha256_file(Path(cfg.run_dir) / "curate" / "decisions.jsonl")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="images in the pool")
    ap.add_argument("--chunk", type=int, default=2048, help="curate.scan_chunk")
    ap.add_argument("--decode-threads", type=int, default=1, help="curate.workers inside each chunk task")
    ap.add_argument("--repeats", type=int, default=1, help="workers 1, 2, 1, 2, ... this many times")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = a.out or Path(tempfile.mkdtemp(prefix="kd3-fanout-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from benchlib import format_machine, machine
    from flows.server import prefect_api

    t = time.perf_counter()
    pool = make_pool(work / "pool", a.n)
    print(f"pool: {a.n} images under {pool} ({time.perf_counter() - t:.0f} s)", flush=True)
    teacher = make_teacher(work / "teacher.pt")
    rows = []
    with prefect_api():
        for rep in range(a.repeats):
            for w in (1, 2):
                rows.append(run_once(work, pool, teacher, w, f"r{rep}-w{w}", a))
                print(json.dumps(rows[-1]), flush=True)
    one = [r for r in rows if r["workers"] == 1]
    two = [r for r in rows if r["workers"] == 2]
    out = {"machine": machine(), "n": a.n, "chunk": a.chunk, "runs": rows,
           "scan_ratio_1_over_2": [round(x["scan_s"] / y["scan_s"], 2) for x, y in zip(one, two)],
           "total_ratio_1_over_2": [round(x["total_s"] / y["total_s"], 2) for x, y in zip(one, two)],
           "same_decisions": len({r["decisions_sha256"] for r in rows}) == 1}
    print(format_machine(out["machine"]))
    print(f"scan, 1 worker / 2 workers: {out['scan_ratio_1_over_2']}; whole flow: {out['total_ratio_1_over_2']}; "
          f"same decisions in every run: {out['same_decisions']}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
