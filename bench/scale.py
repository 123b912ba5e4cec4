"""How kd3's stages grow with the pool (issue 21): numbers for the README; no assertions.

A generated pool of N 32-px images (mixed content: scikit-learn digits upsampled and coloured, crops of the
photos that ship with scikit-learn/scikit-image, random textures, gradients and solid colours; ~2 % exact
duplicates and ~0.5 % near duplicates; deterministic from ``--seed``) is written as one ``.npy`` and read as an
``arrays`` pool (the paper's path, ``crawl.assign: teacher``). Each stage runs as its own ``kd3`` subprocess:
``crawl`` (read, store as PNG, assign by the teacher), ``curate`` (teacher embeddings), ``distill --epochs 1``
for kd3's default and for kd, ``inspect`` and ``inspect --html``. Per stage: seconds per 1,000 images, peak RSS
of the stage's process tree (``wait4``: the largest single process), bytes the stage added to the run
directory; over the sizes the growth exponent of time and of RSS (least squares on log n). The teacher is a
``cnn_small`` (10 classes, 32 px) trained for ~200 SGD steps on the scikit-learn digits: a real network of the
paper's input size whose cost is what is measured, not its accuracy.

    .venv/bin/python bench/scale.py                         # 10k, 50k, 200k (about an hour on 2 cores)
    .venv/bin/python bench/scale.py --quick                 # 10k only: the CI smoke test
    .venv/bin/python bench/scale.py --sizes 2000 5000       # any sizes
    .venv/bin/python bench/scale.py --sizes 10000 --keep /tmp/kd3-scale   # keep the runs to look at
"""
from __future__ import annotations

import argparse
import json
import os

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import format_machine, machine  # noqa: E402

STAGES = ("crawl", "curate", "distill-kd3", "distill-kd", "inspect", "inspect-html")
PX = 32


# ---------------------------------------------------------------- the pool

def _sources() -> dict:
    """Material the pool is cut from: digits (8x8, 0..16), photos (RGB uint8)."""
    import skimage.data as d
    from sklearn.datasets import load_digits, load_sample_images

    photos = list(load_sample_images().images)
    for k in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        a = getattr(d, k)()
        photos.append(a if a.ndim == 3 else np.repeat(a[..., None], 3, 2))
    return {"digits": load_digits().images, "photos": photos}


def _digits(rng, src, n: int) -> np.ndarray:
    return _digit_images(rng, src["digits"][rng.integers(0, len(src["digits"]), n)])


def _digit_images(rng, images: np.ndarray) -> np.ndarray:
    """8x8 digits (0..16) upsampled to 32 px, a random foreground and background colour each."""
    from PIL import Image

    out = np.empty((len(images), PX, PX, 3), np.uint8)
    for i, g in enumerate(images):
        g = np.asarray(Image.fromarray((g / 16 * 255).astype(np.uint8)).resize((PX, PX), Image.BILINEAR)) / 255.0
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out[i] = (g[..., None] * fg + (1 - g[..., None]) * bg).astype(np.uint8)
    return out


def _photos(rng, src, n: int) -> np.ndarray:
    from PIL import Image

    ims = [Image.fromarray(np.ascontiguousarray(p[..., :3])) for p in src["photos"]]
    out = np.empty((n, PX, PX, 3), np.uint8)
    for i in range(n):
        im = ims[rng.integers(len(ims))]
        w, h = im.size
        s = int(min(w, h) * rng.uniform(0.05, 0.6))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        out[i] = np.asarray(im.crop((x, y, x + s, y + s)).resize((PX, PX), Image.BILINEAR))
    return out


def _textures(rng, n: int) -> np.ndarray:
    """Random smooth noise, stripes, checkers, gradients and (a few) flat colours with grain."""
    yy, xx = np.mgrid[0:PX, 0:PX] / PX
    out = np.empty((n, PX, PX, 3), np.uint8)
    for i in range(n):
        kind = rng.integers(5)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == 0:
            small = rng.uniform(0, 1, (4 + rng.integers(12), 4 + rng.integers(12)))
            t = np.kron(small, np.ones((PX, PX)))[:PX * small.shape[0]:small.shape[0], :PX * small.shape[1]:small.shape[1]]
        elif kind == 1:
            f, a = rng.uniform(2, 12), rng.uniform(0, np.pi)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)))
        elif kind == 2:
            k = 2 + rng.integers(8)
            t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(float)
        elif kind == 3:
            a = rng.uniform(0, np.pi)
            t = (xx * np.cos(a) + yy * np.sin(a)) / 1.5 + 0.2
        else:
            t = np.full((PX, PX), 0.5)
        img = c0 + t[..., None].clip(0, 1) * (c1 - c0) + rng.normal(0, 6, (PX, PX, 3))
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out


def make_pool(n: int, seed: int, path: Path) -> dict:
    """Write the pool to ``path`` (.npy, N x 32 x 32 x 3 uint8); return what it holds."""
    rng = np.random.default_rng(seed)
    src = _sources()
    n_exact, n_near = round(n * 0.02), round(n * 0.005)
    n_base = n - n_exact - n_near
    parts = [(_digits, round(n_base * 0.3)), (_photos, round(n_base * 0.45))]
    arr = np.lib.format.open_memmap(path, "w+", np.uint8, (n, PX, PX, 3))
    i = 0
    for fn, k in parts:
        arr[i:i + k] = fn(rng, src, k)
        i += k
    arr[i:n_base] = _textures(rng, n_base - i)
    src_rows = rng.integers(0, n_base, n_exact + n_near)
    arr[n_base:n_base + n_exact] = arr[src_rows[:n_exact]]
    near = arr[src_rows[n_exact:]].astype(np.int16) + rng.integers(-3, 4, (n_near, PX, PX, 3))
    arr[n_base + n_exact:] = near.clip(0, 255).astype(np.uint8)
    order = rng.permutation(n)  # copies spread through the file, as in a real pool
    arr[:] = arr[order]
    arr.flush()
    return {"n": n, "exact_copies": n_exact, "near_copies": n_near, "bytes": path.stat().st_size}


# ---------------------------------------------------------------- the teacher

def make_teacher(path: Path, steps: int = 200, seed: int = 0) -> Path:
    """cnn_small, 10 digit classes, 32 px, ``steps`` SGD steps on coloured digits (seconds)."""
    import torch
    from sklearn.datasets import load_digits

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    d = load_digits()
    rng = np.random.default_rng(seed)
    model = create_model("cnn_small", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        idx = rng.integers(0, len(d.images), 64)
        x = torch.from_numpy(_digit_images(rng, d.images[idx])).permute(0, 3, 1, 2).float() / 255
        loss = torch.nn.functional.cross_entropy(model((x - 0.5) / 0.25), torch.from_numpy(d.target[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, "cnn_small", [f"digit{k}" for k in range(10)], PX, [0.5] * 3, [0.25] * 3,
                    model.state_dict())
    return path


# ---------------------------------------------------------------- the stages

def run_config(work: Path, pool: Path, teacher: Path, student: str) -> Path:
    import yaml

    cfg = {"name": "scale", "runs_root": str(work / "runs"), "teacher": str(teacher),
           "crawl": {"sources": ["arrays"], "arrays": [str(pool)], "assign": "teacher"},
           "curate": {"embed_backend": "teacher", "device": "cpu", "workers": 2, "batch_size": 256},
           "distill": {"student": student, "epochs": 1, "batch_size": 256, "workers": 0, "device": "cpu"}}
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_commands(cfg: Path, run: Path) -> dict[str, list[str]]:
    kd3 = [sys.executable, "-m", "pipeline.app.cli"]
    distill = kd3 + ["distill", "--config", str(cfg), "--epochs", "1"]
    return {"crawl": kd3 + ["crawl", "--config", str(cfg)],
            "curate": kd3 + ["curate", "--config", str(cfg)],
            "distill-kd3": distill + ["--method", "kd3", "--out-id", "scale"],
            "distill-kd": distill + ["--method", "kd", "--out-id", "scale"],
            "inspect": kd3 + ["inspect", str(run)],
            "inspect-html": kd3 + ["inspect", str(run), "--html"]}


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) under root."""
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


# Runs one stage and prints its wait4 rusage as JSON. The stage is forked from this small process, not from
# the bench (which holds the pool and torch): Linux carries a process's peak RSS across fork and exec, so a
# child of the bench would report the bench's own peak.
_LAUNCH = ("import json, os, subprocess, sys\n"
           "p = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT)\n"
           "_, status, ru = os.wait4(p.pid, 0)\n"
           "print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'rss': ru.ru_maxrss * 1024,\n"
           "                  'cpu_s': ru.ru_utime + ru.ru_stime}))\n")


def run_stage(argv: list[str], run: Path, log: Path, threads: int | None = None) -> dict:
    """Run one stage as a subprocess: wall seconds, CPU seconds, peak RSS (the largest process of its tree,
    from wait4), bytes and files it added to the run directory. ``threads``: the stage's OpenMP/BLAS threads
    (torch's intra-op pool); 1 keeps its CPU time honest on a shared machine, where idle OpenMP threads spin."""
    b0, f0 = tree_bytes(run)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", KD3_LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCH, str(log), *argv], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    b1, f1 = tree_bytes(run)
    try:
        r = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        r = {"rc": out.returncode or 1, "rss": 0, "cpu_s": 0.0}
    return {**r, "s": wall, "bytes": b1 - b0, "files": f1 - f0}


def bench_size(n: int, work: Path, teacher: Path, seed: int, student: str, threads: int | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    pool = make_pool(n, seed, work / f"pool-{n}.npy")
    pool["make_s"] = time.perf_counter() - t
    cfg = run_config(work, work / f"pool-{n}.npy", teacher, student)
    run = work / "runs" / "scale"
    run.mkdir(parents=True, exist_ok=True)
    out = {"pool": pool, "stages": {}}
    for stage, argv in stage_commands(cfg, run).items():
        r = run_stage(argv, run, work / f"{stage}.log", threads)
        out["stages"][stage] = r
        print(f"  n={n:>7} {stage:<13} {r['s']:8.1f} s  rss {r['rss'] / 2**20:7.0f} MB  "
              f"+{r['bytes'] / 2**20:8.1f} MB  rc {r['rc']}", flush=True)
        if r["rc"] != 0:
            print((work / f"{stage}.log").read_text()[-3000:], flush=True)
            break
    out["facts"] = run_facts(run, n)
    return out


# ---------------------------------------------------------------- what the run holds

def run_facts(run: Path, n: int) -> dict:
    facts = {"selection_bytes": {}, "embeddings_bytes": 0}
    for sel in sorted((run / "distill").glob("*/selection.jsonl")):
        facts["selection_bytes"][sel.parent.name.split("-")[0]] = sel.stat().st_size
    emb = run / "curate" / "embeddings.npy"
    if emb.is_file():
        facts["embeddings_bytes"] = emb.stat().st_size
        facts["embedding_shape"] = list(np.load(emb, mmap_mode="r").shape)
    facts["report"] = report_facts(run / "report")
    return facts


def report_facts(report: Path) -> dict:
    """Size of the report (page + thumbnails), the page's elements, images and table pages; its load time in
    headless Chromium when one is installed."""
    from html.parser import HTMLParser

    page = report / "index.html"
    if not page.is_file():
        return {}
    counts: dict[str, int] = {}

    class Count(HTMLParser):
        def handle_starttag(self, tag, attrs):
            counts[tag] = counts.get(tag, 0) + 1

    Count().feed(page.read_text(encoding="utf-8"))
    pages = [p for p in report.rglob("*.html")]
    size, files = tree_bytes(report)
    out = {"bytes": size, "files": files, "page_bytes": page.stat().st_size, "html_pages": len(pages),
           "elements": sum(counts.values()), "img": counts.get("img", 0), "tr": counts.get("tr", 0)}
    out["chromium"] = chromium_load(page)
    return out


def chromium_load(page: Path) -> dict | str:
    sys.path.insert(0, str(ROOT / "tests" / "inspect"))
    try:
        from cdp import Chromium, find_chromium
    except ImportError as e:  # websockets missing
        return f"not measured: {e}"
    if find_chromium() is None:
        return "not measured: no Chromium here"
    with Chromium(timeout=120) as ch:
        t = time.perf_counter()
        res = ch.load(page.resolve().as_uri())
        s = time.perf_counter() - t
    broken = sum(1 for i in res["images"] if not i["w"])
    return {"s": s, "images": len(res["images"]), "broken_images": broken, "console_errors": len(res["console_errors"])}


# ---------------------------------------------------------------- the table

def exponent(ns: list[int], ys: list[float]) -> float | None:
    """Slope of log y on log n (least squares); None with fewer than two sizes."""
    if len(ns) < 2 or min(ys) <= 0:
        return None
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def print_table(results: dict[int, dict]) -> None:
    """Per stage and size: wall and CPU seconds per 1,000 images, peak RSS, MB written; then the growth
    exponents of wall and CPU time (log-log fit over the sizes) and the RSS growth in bytes per image."""
    ns = sorted(results)
    head = " | ".join(f"{n:,}: s/1k (CPU), RSS MB, MB written" for n in ns)
    print(f"\n| stage | {head} | exponent wall (CPU) | RSS growth B/image |")
    print("|---|" + "---|" * len(ns) + "---|---|")
    for stage in STAGES:
        got = [(n, results[n]["stages"].get(stage)) for n in ns]
        got = [(n, r) for n, r in got if r is not None and r.get("rc") == 0]
        if not got:
            continue
        by_n = dict(got)
        cells = [f"{r['s'] / n * 1000:.2f} ({_fmt(r.get('cpu_s') and r['cpu_s'] / n * 1000)}), {r['rss'] / 2**20:.0f}, "
                 f"{r['bytes'] / 2**20:.1f}" if (r := by_n.get(n)) else "not run" for n in ns]
        gn = [n for n, _ in got]
        te = exponent(gn, [r["s"] for _, r in got])
        cpu = [(n, r["cpu_s"]) for n, r in got if r.get("cpu_s")]
        ce = exponent([n for n, _ in cpu], [c for _, c in cpu])
        growth = (got[-1][1]["rss"] - got[0][1]["rss"]) / (gn[-1] - gn[0]) if len(gn) > 1 else None
        print(f"| {stage} | " + " | ".join(cells) + f" | {_fmt(te)} ({_fmt(ce)}) | {_fmt(growth, ',.0f')} |")
    print()
    for n in ns:
        if results[n].get("facts"):
            print_facts(n, results[n])


def print_facts(n: int, res: dict) -> None:
    f = res["facts"]
    rep = f.get("report", {})
    sel = ", ".join(f"{m} {b:,} B ({b / n * 1e6 / 2**20:.2f} MB per epoch per 10^6 images)"
                    for m, b in f["selection_bytes"].items())
    emb = f["embeddings_bytes"]
    print(f"n={n:,}: pool {res['pool']}")
    print(f"  embeddings {emb / 2**20:.1f} MB = {emb / n:.0f} B/image {f.get('embedding_shape')}; "
          f"selection.jsonl: {sel}")
    if rep:
        print(f"  report: {rep['bytes'] / 2**20:.2f} MB in {rep['files']} files (page {rep['page_bytes'] / 2**20:.2f} MB, "
              f"{rep['elements']:,} elements, {rep['img']:,} <img>, {rep['tr']:,} <tr>, {rep['html_pages']} pages); "
              f"Chromium: {rep['chromium']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", help="pool sizes (default 10000 50000 200000; --quick: 10000)")
    ap.add_argument("--quick", action="store_true", help="10k only (the CI smoke test); --sizes overrides the size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student", default="cnn_mini")
    ap.add_argument("--teacher-steps", type=int, default=200, help="SGD steps of the teacher on the digits")
    ap.add_argument("--keep", type=Path, help="work here and keep the runs (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--threads", type=int, help="OpenMP/BLAS threads per stage (default: the libraries' own)")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print the table of a --json file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_table({int(k): v for k, v in json.loads(args.table.read_text()).items()})
        return 0
    args.sizes = args.sizes or ([10_000] if args.quick else [10_000, 50_000, 200_000])
    work = args.keep or Path(tempfile.mkdtemp(prefix="kd3-scale-"))
    print(f"scale bench: sizes {args.sizes}, 32 px, teacher cnn_small ({args.teacher_steps} SGD steps on digits) -> {args.student}, "
          f"threads {args.threads or 'default'}, work {work}\nmachine: {format_machine(machine())}", flush=True)
    try:
        t = time.perf_counter()
        teacher = make_teacher(work / "teacher.pt", args.teacher_steps)
        print(f"teacher: {time.perf_counter() - t:.1f} s", flush=True)
        results = {}
        for n in args.sizes:
            results[n] = bench_size(n, work / f"n{n}", teacher, args.seed, args.student, args.threads)
            if args.json:  # after each size: a long run cut short keeps what it measured
                args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1, default=str))
        print_table(results)
        return 0 if all(r["rc"] == 0 for v in results.values() for r in v["stages"].values()) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
