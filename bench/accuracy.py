"""Accuracy benchmark: KD³ against KD and DFND on the demo world, several seeds.

For every seed the whole demo runs (world → teacher → fake web → Prefect flow: crawl, curate, kd3),
then kd, dfnd and the KD³ ablations distill on the *same* curated data with the same student and
epochs, and the student is also trained on the original labelled train split (the upper reference).
Every number is last-epoch top-1 on the held-out original-domain test split. Prints one table
(mean ± std over seeds), the per-seed numbers, and what each method's last-epoch selection held by
ground-truth kind (for the analysis: which junk gets selected). Nothing is tuned per method.

    .venv/bin/python bench/accuracy.py                       # bench size, seeds 0,1,2
    .venv/bin/python bench/accuracy.py --size small --seeds 0 --epochs 5   # quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd3demo.demo import DemoSettings, run_demo  # noqa: E402
from pipeline.core.io import atomic_write_json  # noqa: E402

ABLATIONS = {
    "kd3 no selection": {"method": "kd3", "kd3.selection": False},
    "kd3 no mixdist/contrastive": {"method": "kd3", "kd3.mixdist": False},
    "kd3 no weighting": {"method": "kd3", "kd3.weighting": False},
}
ORIGINAL = "student on original labels"


def train_on_original(world, out: Path, arch: str, epochs: int, seed: int, batch_size: int, lr: float) -> float:
    """The student architecture trained with labels on the original train split (upper reference)."""
    from distill.teacher_train import train_teacher

    summary = train_teacher(world.train_dir, arch, out / "student-original-labels.pt", epochs=epochs,
                            img_size=world.spec.img_size, batch_size=batch_size, lr=lr,
                            val_dir=world.test_dir, device="cpu", seed=seed)
    return float(summary["val_acc"])


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="bench", choices=["tiny", "small", "bench"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="student epochs (default: the size's)")
    ap.add_argument("--student", help="student architecture (default: the size's)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    ap.add_argument("--no-ablations", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    per_seed: dict[int, dict] = {}
    t0 = time.time()
    for seed in seeds:
        s = DemoSettings(out=a.out / f"{a.size}-seed{seed}", size=a.size, seed=seed, epochs=a.epochs,
                         student=a.student, variants={} if a.no_ablations else dict(ABLATIONS), report=False)
        summary = run_demo(s)
        from kd3demo.world import load_world

        world = load_world(Path(summary["run_dir"]).parent.parent / "world")
        ref = train_on_original(world, Path(s.out), summary["student"], summary["epochs"], seed,
                                summary["batch_size"], summary["lr"])
        summary["methods"].append({"method": ORIGINAL, "top1": ref, "teacher_top1": summary["teacher_top1"],
                                   "gap": ref - summary["teacher_top1"], "selected_fraction": None})
        per_seed[seed] = summary
        print(f"seed {seed} done in {time.time() - t0:.0f}s: " +
              ", ".join(f"{m['method']} {100 * m['top1']:.2f}" for m in summary["methods"]), flush=True)

    labels = [m["method"] for m in per_seed[seeds[0]]["methods"]]
    teacher = [per_seed[sd]["teacher_top1"] for sd in seeds]
    tm, ts = mean_std(teacher)
    first = per_seed[seeds[0]]
    print()
    print(f"## Accuracy on the held-out digits (size {a.size}, seeds {a.seeds}, student {first['student']}, "
          f"{first['epochs']} epochs, teacher {first['teacher_arch']}, curate embeddings {first['embed_backend']})")
    print()
    print(f"| method | top-1 (mean ± std) | gap to teacher | selected fraction |")
    print(f"|---|---|---|---|")
    print(f"| teacher | {100 * tm:.2f} ± {100 * ts:.2f} | – | – |")
    table = []
    for label in labels:
        rows = [next(m for m in per_seed[sd]["methods"] if m["method"] == label) for sd in seeds]
        top = [r["top1"] for r in rows]
        gaps = [r["top1"] - per_seed[sd]["teacher_top1"] for r, sd in zip(rows, seeds)]
        sels = [r["selected_fraction"] for r in rows if r.get("selected_fraction") is not None]
        m, sd_ = mean_std(top)
        g, _ = mean_std(gaps)
        sel = f"{100 * statistics.fmean(sels):.1f}%" if sels else "–"
        print(f"| {label} | {100 * m:.2f} ± {100 * sd_:.2f} | {100 * g:+.2f} | {sel} |")
        table.append({"method": label, "top1_mean": m, "top1_std": sd_, "gap_mean": g, "per_seed": top})
    print()
    print("Last-epoch selection by ground-truth kind (seed %d):" % seeds[0])
    for mth in first["methods"]:
        sel = mth.get("selection") or {}
        if sel.get("by_kind"):
            print(f"  {mth['method']:<28} {sel['selected']:>5} selected: {json.dumps(sel['by_kind'])}")
    print("Curate decisions by ground-truth kind (seed %d): %s" % (seeds[0], json.dumps(first["curate"])))
    print(f"\ntotal time {time.time() - t0:.0f}s")
    atomic_write_json(a.out / f"accuracy-{a.size}.json", {"size": a.size, "seeds": seeds, "table": table,
                                                           "teacher": teacher, "per_seed": per_seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
