"""Accuracy benchmark that can rank methods: paired seeds, two shift levels, an oracle gate.

For every shift level (``far``: 30% of the web digits scan-like, the demo's world; ``near``: all of them
scan-like) and every seed, the whole demo runs once (world -> teacher -> fake web -> Prefect flow:
crawl, curate, the first method), then every other row distills on the *same* curated pool, with the
same student initialisation and the same epochs (paired: a seed's rows differ only by method). Extra
rows: an **oracle** (KD on the pool's real digits only, from the world's ground truth) and the student
trained with labels on the original train split (upper reference). Every number is last-epoch top-1 on
the held-out original test digits.

Printed per level: mean ± std of each row, the paired difference to KD with its 95% t-interval, the
oracle gate (a world where removing the junk by oracle does not beat KD beyond the noise cannot rank
selection methods, and the bench says so), and per epoch the selection quality of each selecting row
(precision = share of the selected that are real digits, recall = share of the pool's digits selected,
junk kept = share of the pool's junk selected).

    .venv/bin/python bench/accuracy.py --jobs 2              # levels far,near; seeds 0-4 (~90 min, 2 cores)
    .venv/bin/python bench/accuracy.py --quick               # seeds 0,1, the key rows (~25 min)
    .venv/bin/python bench/accuracy.py --levels far --seeds 0 --rows kd,kd3 --epochs 5   # a smoke look
    .venv/bin/python bench/accuracy.py --jobs 2 --teacher-arch cnn_small_ln --rows "kd,kd3,kd3 anchors"
                                         # a LayerNorm teacher: the fallback rule against KD and the anchors rule
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd3demo.demo import DIGIT_AUGMENT, DemoSettings, run_demo  # noqa: E402
from kd3demo.scoring import DIGIT_KINDS, kind_by_key, selection_quality  # noqa: E402
from kd3demo.world import SHIFTS, load_world  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.io import atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402
from pipeline.core.records import read_metrics, read_pool_keys  # noqa: E402

BASE = "kd"
ORACLE = "oracle: kd on real digits"
ORIGINAL = "student on original labels"
# label -> distill overrides; each kd3 switch is measured alone on top of the release's method
# the release exactly (its teacher term cannot move the student)
RELEASE = {"kd3.selection_rule": "confidence", "kd3.equal_steps": False, "kd3.kd_weight": 0.0,
           "kd3.teacher_contrastive": True, "kd3.mix_level": "input"}
ROWS: dict[str, dict] = {
    "kd": {"method": "kd"},
    "kd3": {"method": "kd3"},                         # kd3's defaults: selection_rule bn, equal_steps, feature mix
    "kd3 release": {"method": "kd3", **RELEASE},
    # kd3's own parts, one at a time on top of the release, and the default without each of them
    "kd3 release + equal steps": {"method": "kd3", **RELEASE, "kd3.equal_steps": True},
    "kd3 release + bn id filter": {"method": "kd3", **RELEASE, "kd3.selection_rule": "bn+confidence"},
    "kd3 bn rule without equal steps": {"method": "kd3", "kd3.selection_rule": "bn", "kd3.equal_steps": False},
    "kd3 no selection": {"method": "kd3", "kd3.selection": False},
    "kd3 + kd term": {"method": "kd3", "kd3.kd_weight": 1.0},
    # one student call on x and x~ (cost; input mix only: the feature mix has no second call)
    "kd3 + fused views": {"method": "kd3", "kd3.fused_views": True, "kd3.mix_level": "input"},
    "kd3 half views": {"method": "kd3", "kd3.view_share": 0.5},  # x~ for half of each batch (cost)
    "kd3 quarter views": {"method": "kd3", "kd3.view_share": 0.25},  # x~ for a quarter of each batch (cost)
    # MixDistribution on the input batch, as the release (kd3's default until issue 21 part 6 measured
    # mix_level feature as good on both levels: that row was "kd3 feature mix")
    "kd3 input mix": {"method": "kd3", "kd3.mix_level": "input"},
    "kd3 no mixdist/contrastive": {"method": "kd3", "kd3.mixdist": False},
    "kd3 no weighting": {"method": "kd3", "kd3.weighting": False},
    # KD with a student at least as large as kd3's deployed one (backbone + projector + the teacher's
    # classifier: 192,474 parameters with cnn_mini on the demo): cnn_mini at width 1.56, 194,085 parameters
    "kd at kd3's size": {"method": "kd", "student": "cnn_mini", "student_settings": {"width": 1.56}},
    "kd3 compact": {"method": "kd3", "kd3.export": "compact"},  # exported at the plain student's size
    # a teacher without BatchNorm (--teacher-arch cnn_small_ln): the BN rule's fallback is the release's rule;
    # the anchors rule reads the teacher's statistics on --anchors N original train images per class
    "kd3 anchors": {"method": "kd3", "kd3.selection_rule": "anchors"},
    # options whose accuracy is not measured yet (docs/METHOD.md, "Every distill.kd3 option")
    "kd3 id quantile": {"method": "kd3", "kd3.id_rule": "quantile"},
    "kd3 no sharing": {"method": "kd3", "kd3.sharing": False},
    "kd3 classifier align": {"method": "kd3", "kd3.classifier_align_loss": True},
    "kd3 cross contrastive": {"method": "kd3", "kd3.cross_contrastive": True},
    "dfnd": {"method": "dfnd"},
    ORACLE: {"method": "kd"},
    ORIGINAL: {},
}
DEFAULT_ROWS = ["kd", "kd3", "kd3 release", "kd3 release + equal steps", "kd3 release + bn id filter",
                "kd3 bn rule without equal steps", "kd3 no selection", "dfnd", ORACLE, ORIGINAL]
QUICK_ROWS = ["kd", "kd3", "kd3 release", ORACLE]
assert not any("," in r for r in ROWS), "--rows is comma-separated: a row label must not hold a comma"


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(xs: list[float], base: list[float]) -> tuple[float, float, float]:
    """Mean paired difference and its 95% t-interval (nan-wide with one seed)."""
    d = [a - b for a, b in zip(xs, base)]
    m = statistics.fmean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h


def oracle_keys(world, method_dir: Path, out: Path) -> Path:
    """Keys of the pool's real digits (copies count as what they copy) -> a keys_file."""
    kind = kind_by_key(read_jsonl(world.truth_path))
    pool = read_pool_keys(method_dir / "pool_keys.txt")
    atomic_write_text(out, "".join(k + "\n" for k in pool if kind.get(k) in DIGIT_KINDS))
    return out


def train_on_original(world, out: Path, arch: str, epochs: int, seed: int, batch_size: int, lr: float) -> float:
    """The student architecture trained with labels on the original train split (upper reference)."""
    from distill.teacher_train import train_teacher

    summary = train_teacher(world.train_dir, arch, out / "student-original-labels.pt", epochs=epochs,
                            img_size=world.spec.img_size, batch_size=batch_size, lr=lr,
                            val_dir=world.test_dir, device="cpu", seed=seed, augment=DIGIT_AUGMENT)
    return float(summary["val_acc"])


def run_seed(level: str, seed: int, rows: list[str], a) -> dict:
    """One (level, seed): the demo with the first distill row in its flow, then the other rows."""
    from distill.stage import distill

    distill_rows = [r for r in rows if r not in (ORACLE, ORIGINAL)]
    first, rest = distill_rows[0], distill_rows[1:]
    tag = f"-{a.teacher_arch}" if a.teacher_arch else ""  # another teacher: another world folder
    s = DemoSettings(out=a.out / f"{a.size}-{level}-seed{seed}{tag}", size=a.size, seed=seed, epochs=a.epochs,
                     student=a.student, teacher_arch=a.teacher_arch, anchors_per_class=a.anchors,
                     methods=[ROWS[first]["method"]], world=dict(SHIFTS[level]), report=False,
                     overrides={f"distill.{k}": v for k, v in ROWS[first].items()},
                     variants={r: ROWS[r] for r in rest})
    summary = run_demo(s)
    world = load_world(Path(s.out) / "world")
    truth = read_jsonl(world.truth_path)
    run_dir = Path(summary["run_dir"])
    results = {}
    for label, m in zip([first] + rest, summary["methods"]):  # the flow's method first, then the variants
        results[label] = {"top1": m["top1"], "selected_fraction": m["selected_fraction"],
                          "quality": selection_quality(Path(m["dir"]), truth), **deployed(Path(m["dir"]))}
    if ORACLE in rows:
        cfg = load_config(run_dir / "config.yaml")
        kf = oracle_keys(world, Path(summary["methods"][0]["dir"]), Path(s.out) / "oracle_keys.txt")
        cfg.distill.method, cfg.distill.keys_file = "kd", kf
        f = distill(cfg, out_id="oracle")["final"]
        n_pool = len(read_pool_keys(Path(summary["methods"][0]["dir"]) / "pool_keys.txt"))
        n_keys = len(kf.read_text().split())
        results[ORACLE] = {"top1": f["top1"], "selected_fraction": n_keys / n_pool, "quality": []}
    if ORIGINAL in rows:
        results[ORIGINAL] = {"top1": train_on_original(world, Path(s.out), summary["student"], summary["epochs"],
                                                       seed, summary["batch_size"], summary["lr"]),
                             "selected_fraction": None, "quality": []}
    return {"teacher_top1": summary["teacher_top1"], "rows": results, "student": summary["student"],
            "epochs": summary["epochs"], "teacher_arch": summary["teacher_arch"]}


def deployed(method_dir: Path) -> dict:
    """The exported model's size as the run recorded it (metrics.json final: params, FLOPs per image)."""
    f = read_metrics(method_dir / "metrics.json").get("final") or {}
    return {"params": f.get("params"), "flops_per_image": f.get("flops_per_image")}


def _size(per_seed: dict[int, dict], r: str) -> str:
    vals = [per_seed[s]["rows"][r].get("params") for s in per_seed]
    fl = [per_seed[s]["rows"][r].get("flops_per_image") for s in per_seed]
    if not vals or any(v is None for v in vals + fl):
        return "–"
    return f"{vals[0]:,} / {fl[0] / 1e6:.1f}"


def _run_pair(level: str, seed: int, rows: list[str], a) -> dict:
    """One (level, seed) in a worker process: one torch thread, quiet logs."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_seed(level, seed, rows, a)


def report_level(level: str, per_seed: dict[int, dict], rows: list[str], vs: str = BASE) -> list[str]:
    """The level's table: per row top-1, the paired difference to kd (and to ``vs`` when it is another row)
    with its 95 % t-interval, the share selected; the oracle gate; selection quality over epochs."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    refs = [BASE] + ([vs] if vs != BASE else [])
    out = [f"## shift {level} ({SHIFTS[level]}), seeds {','.join(map(str, seeds))}, student {first['student']}, "
           f"{first['epochs']} epochs, teacher {first['teacher_arch']}", "",
           "| row | top-1 (mean ± std) | " + " | ".join(f"paired Δ to {r} [95% CI]" for r in refs) +
           " | deployed params / MFLOPs | selected |",
           "|---|---|" + "---|" * len(refs) + "---|---|"]
    tm, ts = mean_std([per_seed[s]["teacher_top1"] for s in seeds])
    out.append(f"| teacher | {100 * tm:.2f} ± {100 * ts:.2f} | " + "– | " * len(refs) + "– | – |")
    top1 = {r: [per_seed[s]["rows"][r]["top1"] for s in seeds] for r in rows}
    for r in rows:
        m, sd = mean_std(top1[r])
        deltas = []
        for ref in refs:
            d, lo, hi = paired(top1[r], top1[ref])
            deltas.append("–" if r == ref else f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
        sel = [per_seed[s]["rows"][r]["selected_fraction"] for s in seeds]
        sel_s = "–" if any(v is None for v in sel) else f"{100 * statistics.fmean(sel):.1f}%"
        out.append(f"| {r} | {100 * m:.2f} ± {100 * sd:.2f} | {' | '.join(deltas)} | {_size(per_seed, r)} | {sel_s} |")
    if ORACLE in rows and len(seeds) > 1:
        _, lo, _ = paired(top1[ORACLE], top1[BASE])
        verdict = ("the oracle beats kd beyond the noise: this world can rank selection methods" if lo > 0 else
                   "the oracle does NOT beat kd beyond the noise: this world cannot rank selection methods")
        out += ["", f"oracle gate: lower 95% bound of oracle − kd = {100 * lo:+.2f} points → {verdict}"]
    out += ["", "selection quality (mean over seeds): precision / recall / junk kept, at epochs:"]
    for r in rows:
        qs = [per_seed[s]["rows"][r]["quality"] for s in seeds]
        if not qs[0] or all(q.get("precision") is None for q in qs[0]):
            continue  # no selection log (oracle, original labels) or nothing ever selected
        n_ep = min(len(q) for q in qs)
        marks = sorted({0, n_ep // 4, n_ep // 2, (3 * n_ep) // 4, n_ep - 1})
        cells = []
        for e in marks:
            vals = [q[e] for q in qs if q[e]["precision"] is not None]
            if not vals:
                continue
            p = statistics.fmean(v["precision"] for v in vals)
            rc = statistics.fmean(v["recall"] for v in vals)
            jk = statistics.fmean(v["junk_kept"] for v in vals)
            cells.append(f"e{e}: {p:.2f}/{rc:.2f}/{jk:.2f}")
        out.append(f"  {r:<28} " + "  ".join(cells))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "bench"])
    ap.add_argument("--levels", default="far,near", help=f"shift levels, of {sorted(SHIFTS)}")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rows", help=f"rows to run, comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="seeds 0,1 and the key rows (development)")
    ap.add_argument("--vs", default=BASE, help="also give each row's paired difference to this row (e.g. kd3, to "
                                                "measure an option's effect); added to the rows if missing")
    ap.add_argument("--epochs", type=int, help="student epochs (default: the size's)")
    ap.add_argument("--student", help="student architecture (default: the size's)")
    ap.add_argument("--teacher-arch", help="teacher architecture (default: the size's, cnn_small; cnn_small_ln: a "
                                           "LayerNorm teacher, no BatchNorm statistics)")
    ap.add_argument("--anchors", type=int, default=0, help="original train images per class as distill.anchor_dir "
                                                           "(default: 10 when a row uses the anchors rule)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    ap.add_argument("--jobs", type=int, default=1,
                    help="(level, seed) pairs run at once, one CPU thread each (2 on a 2-core machine)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.quick and a.seeds == ap.get_default("seeds"):
        a.seeds = "0,1"
    rows = [r.strip() for r in a.rows.split(",")] if a.rows else (QUICK_ROWS if a.quick else DEFAULT_ROWS)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    if a.vs not in ROWS:
        ap.error(f"unknown --vs row {a.vs!r}; choose from {list(ROWS)}")
    if a.anchors == 0 and any(ROWS[r].get("kd3.selection_rule") == "anchors" for r in rows):
        a.anchors = 10
    rows = [BASE] + [r for r in rows if r != BASE]
    if a.vs not in rows:
        rows.insert(1, a.vs)
    levels = [lv.strip() for lv in a.levels.split(",") if lv.strip()]
    bad = [lv for lv in levels if lv not in SHIFTS]
    if bad:
        ap.error(f"unknown levels {bad}; choose from {sorted(SHIFTS)}")
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    t0 = time.time()
    results: dict[str, dict[int, dict]] = {}
    pairs = [(level, seed) for level in levels for seed in seeds]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: torch, Prefect and threads start clean
    with concurrent.futures.ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as ex:
        futs = {ex.submit(_run_pair, level, seed, rows, a): (level, seed) for level, seed in pairs}
        for fut in concurrent.futures.as_completed(futs):
            level, seed = futs[fut]
            r = fut.result()
            results.setdefault(level, {})[seed] = r
            print(f"[{time.time() - t0:.0f}s] {level} seed {seed}: " +
                  ", ".join(f"{k} {100 * v['top1']:.2f}" for k, v in r["rows"].items()), flush=True)
    lines = []
    for level in levels:
        lines += report_level(level, results[level], rows, a.vs) + [""]
    lines.append(f"total time {time.time() - t0:.0f}s")
    print("\n" + "\n".join(lines))
    atomic_write_json(a.out / f"accuracy-{a.size}.json", {"size": a.size, "levels": levels, "seeds": seeds,
                                                           "rows": rows, "results": results})
    atomic_write_text(a.out / f"accuracy-{a.size}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
