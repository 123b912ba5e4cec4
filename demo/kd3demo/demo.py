"""`kd3 demo`: the whole mission offline, on a world generated at demo time.

1. Generate the demo world (:mod:`kd3demo.world`): scikit-learn's handwritten digits are the
   teacher's original data (train split → teacher, test split → evaluation, both hidden from the
   pipeline); a shifted, noisy pool of font-rendered digits + junk + duplicates + broken files is the
   "web".
2. Train the teacher on the original train split (``kd3 teacher train``).
3. Serve the pool on 127.0.0.1 with :class:`kd3demo.fakeweb.FakeWeb` (Bing result pages) and point
   the crawl's **Bing** source at it (``crawl.engine_urls.bing``, ``crawl.allow_private_hosts``):
   the same code path as a real crawl.
4. Run the Prefect end-to-end flow (``flows.e2e.kd3_pipeline``): crawl → curate (teacher
   embeddings unless local CLIP weights are given) → distill with kd3.
5. Distill kd and dfnd (same student, epochs and curated data), evaluate every student on the
   held-out original test split, write the HTML report, print the table.

Everything lands under ``--out`` (default ``demo-out/``): ``world/``, ``teacher.pt``,
``runs/digits/`` (the run directory), ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from distill.stage import output_dir
from pipeline.app.report import write_report
from pipeline.core.checkpoint import read_teacher_classes
from pipeline.core.config import RunConfig, parse_override_value, set_by_path
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import atomic_write_json, read_jsonl
from pipeline.core.records import read_metrics

from . import world as dw
from .scoring import curate_breakdown, selection_breakdown
from .fakeweb import FakeWeb
from .webtree import export_web_tree

log = logging.getLogger("kd3.demo")

RUN_NAME = "digits"
# digits are not mirror-symmetric: pad + random crop, no flip, for the teacher and every student alike
DIGIT_AUGMENT = "crop"


@dataclass
class DemoSettings:
    """What one demo run does; ``kd3 demo`` fills it from the flags, the benchmark builds its own."""

    out: Path = Path("demo-out")
    size: str = "small"
    seed: int = 0
    epochs: Optional[int] = None          # student epochs (default: per size)
    student: Optional[str] = None         # default: per size
    teacher_arch: Optional[str] = None
    teacher_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    methods: list[str] = field(default_factory=lambda: ["kd3", "kd", "dfnd"])
    # extra distill variants run on the same curated data: label -> distill overrides
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    clip_weights: Optional[Path] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted RunConfig overrides (--set)
    world: dict[str, Any] = field(default_factory=dict)      # WorldSpec overrides (--world), e.g. scan_fraction
    report: bool = True
    anchors_per_class: int = 0  # > 0: distill.anchor_dir = that many original train images per class


# Per-size defaults, chosen to fit the budgets measured on 2 shared CPU cores (docs/BENCHMARKS.md).
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Students: cnn_mini (~80k params) is cnn_small (the teacher, ~0.3M) at half width. cnn_tiny
    # (~6k) was measured too small to learn anything that transfers (every method at chance), and
    # KD3's feature alignment needs more SGD steps than 15 epochs at batch 128 give on ~850 images.
    "tiny": dict(epochs=2, student="cnn_tiny", teacher_arch="cnn_small", teacher_epochs=4, batch_size=64),
    "small": dict(epochs=60, student="cnn_mini", teacher_arch="cnn_small", teacher_epochs=15, batch_size=32),
    "bench": dict(epochs=60, student="cnn_mini", teacher_arch="cnn_small", teacher_epochs=20, batch_size=32),
}


def _resolved(s: DemoSettings) -> DemoSettings:
    d = SIZE_DEFAULTS[s.size]
    for k in ("epochs", "student", "teacher_arch", "teacher_epochs", "batch_size"):
        if getattr(s, k) is None:
            setattr(s, k, d[k])
    return s


# ---------------------------------------------------------------- pieces

def local_clip_weights(cfg_weights: Optional[Path] = None) -> Optional[Path]:
    """A local open_clip weights file, if the user has one (the demo never downloads)."""
    if cfg_weights is not None:
        p = Path(cfg_weights)
        if not p.is_file():
            raise ConfigError(f"--clip-weights {p} does not exist")
        return p
    env = os.environ.get("KD3_CLIP_WEIGHTS")
    if env and Path(env).is_file():
        return Path(env)
    return None


def train_demo_teacher(world, out: Path, arch: str, epochs: int, seed: int, batch_size: int,
                       lr: float = 0.05) -> Path:
    """Train (or reuse) the teacher on the original train split with ``kd3 teacher train``."""
    path = out / "teacher.pt"
    if path.is_file():
        log.info("teacher %s exists; reusing it", path)
        return path
    from distill.teacher_train import train_teacher  # heavy (torch): only once the demo runs

    summary = train_teacher(world.train_dir, arch, path, epochs=epochs, img_size=world.spec.img_size,
                            batch_size=batch_size, lr=lr, val_dir=world.test_dir, device="cpu", seed=seed,
                            augment=DIGIT_AUGMENT)
    log.info("teacher %s: %s params, held-out top-1 %.4f, %.0fs", arch, summary.get("params"),
             summary.get("val_acc", float("nan")), summary.get("time_s", 0))
    atomic_write_json(path.with_suffix(".json"), summary)
    return path


def write_anchors(world, out: Path, per_class: int) -> Path:
    """``out/<class>/``: the first ``per_class`` images of each class of the original train split (the images a
    user who kept a few originals would give as distill.anchor_dir; never the test split)."""
    import shutil

    for d in sorted(p for p in world.train_dir.iterdir() if p.is_dir()):
        (out / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(d.iterdir())[:per_class]:
            if not (out / d.name / f.name).exists():
                shutil.copy(f, out / d.name / f.name)
    return out


def demo_config(s: DemoSettings, world, teacher: Path, bing_url: str, crawl_per_class: int) -> RunConfig:
    clip = local_clip_weights(s.clip_weights)
    data: dict[str, Any] = {
        "name": RUN_NAME,
        "runs_root": str(s.out / "runs"),
        "classes": read_teacher_classes(teacher),
        "teacher": str(teacher),
        "crawl": {
            "sources": ["bing"],
            "engine_urls": {"bing": bing_url},
            "allow_private_hosts": True,
            "per_class": crawl_per_class,
            "query_templates": ["{c}"],
            "max_results_per_query": crawl_per_class * 2,
            "threads": 4,
            "rate_limit_per_domain": 1000.0,
            "retries": 1,
            "backoff_s": 0.05,
            "connect_timeout_s": 5.0,
            "read_timeout_s": 10.0,
            "deadline_s": 600.0,
        },
        "curate": {
            "embed_backend": "clip" if clip else "teacher",
            "clip_weights": str(clip) if clip else None,
            "min_side": 24,
            "device": "cpu",
            "workers": 2,
            "batch_size": 128,
            "max_side": 64,
            # the near-dup cut is calibrated on the pool (curate.near_dup_threshold: auto, the default):
            # teacher features are far more alike than CLIP's (on this world it measures ~0.998)
        },
        "distill": {
            "method": s.methods[0] if s.methods else "kd3",
            "student": s.student,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "eval_dir": str(world.test_dir),
            "augment": DIGIT_AUGMENT,
            "device": "cpu",
            "workers": 0,
            "seed": s.seed,
            "img_size": world.spec.img_size,
        },
        "flow": {"task_runner": "thread", "crawl_concurrency": 2},
    }
    if s.anchors_per_class > 0:
        data["distill"]["anchor_dir"] = str(write_anchors(world, s.out / "anchors", s.anchors_per_class))
    for k, v in s.overrides.items():
        set_by_path(data, k, v)
    try:
        return RunConfig.model_validate(data)
    except Exception as e:  # pydantic ValidationError → one line
        raise ConfigError(f"demo config: {e}".splitlines()[0]) from None


def _variant_cfg(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """``overrides``: distill keys, dotted below ``distill`` (``method``, ``kd3.selection``, ...)."""
    d = cfg.model_dump()
    for k, v in overrides.items():
        set_by_path(d, "distill." + k if not k.startswith("distill.") else k, v)
    return RunConfig.model_validate(d)


def _final(method_dir: Path) -> dict[str, Any]:
    return read_metrics(method_dir / "metrics.json").get("final", {})


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<16} {'top-1':>7} {'gap to teacher':>15} {'selected':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sel = r.get("selected_fraction")
        sel_s = "-" if sel is None else f"{100 * sel:.1f}%"
        gap = r.get("gap")
        gap_s = "-" if gap is None else f"{100 * gap:+.2f}"
        lines.append(f"{r['method']:<16} {100 * r['top1']:>6.2f}% {gap_s:>15} {sel_s:>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the demo

def _setup_offline() -> None:
    """Offline, no analytics: the demo never reaches out (also when not started through `make demo`)."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(k, v)
    for noisy in ("httpx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _distill_all(s: DemoSettings, world, teacher: Path, timings: dict) -> tuple[RunConfig, dict[str, Path]]:
    """The Prefect flow (crawl the fake web, curate, the first method), then the other methods and
    variants on the same curated data. Returns the run config and each method's output folder."""
    from flows.e2e import kd3_pipeline  # heavy (Prefect): only once the demo runs, not for `kd3 --help`
    from flows.stages import distill as distill_flow

    pool = world.pool()
    per_query = max(v for q in world.counts["web"].values() for v in [sum(q.values())])
    method_dirs: dict[str, Path] = {}
    with FakeWeb() as web:
        dw.register_on_fakeweb(web, pool, exact=world.spec.query_world is not None)  # a query world: exact queries
        cfg = demo_config(s, world, teacher, web.engine_urls()["bing"], per_query)
        log.info("demo: fake web at %s serving %d files; curate embeddings: %s", web.base_url, len(pool),
                 cfg.curate.embed_backend)
        t = time.time()
        res = kd3_pipeline(cfg)
        timings[f"flow (crawl+curate+{cfg.distill.method})"] = time.time() - t
    method_dirs[cfg.distill.method] = _out_dir(res["distill"], cfg)
    jobs = [(m, {"method": m}) for m in s.methods[1:]] + list(s.variants.items())
    for label, ov in jobs:
        t = time.time()
        log.info("demo: distilling %s on the same curated data", label)
        vcfg = _variant_cfg(cfg, ov)
        method_dirs[label] = _out_dir(distill_flow(vcfg), vcfg)
        timings[f"distill {label}"] = time.time() - t
    return cfg, method_dirs


def _method_results(method_dirs: dict[str, Path], truth_rows: list[dict]) -> tuple[list[dict], Optional[float]]:
    results: list[dict[str, Any]] = []
    teacher_top1 = None
    for label, d in method_dirs.items():
        f = _final(d)
        teacher_top1 = f.get("teacher_top1", teacher_top1)
        results.append({"method": label, "dir": str(d), "top1": f.get("top1"),
                        "teacher_top1": f.get("teacher_top1"),
                        "gap": None if f.get("teacher_top1") is None else f["top1"] - f["teacher_top1"],
                        "selected_fraction": f.get("selected_fraction"),
                        "selection": selection_breakdown(d, truth_rows)})
    return results, teacher_top1


def run_demo(s: DemoSettings) -> dict[str, Any]:
    s = _resolved(s)
    _setup_offline()
    t0 = time.time()
    timings: dict[str, float] = {}
    out = Path(s.out).resolve()
    s.out = out
    spec = dw.spec_for(s.size, seed=s.seed, **s.world)
    log.info("demo: generating the world (%s, seed %d) under %s", s.size, s.seed, out / "world")
    world = dw.generate_world(out / "world", spec)
    log.info("demo: the web as a folder tree <class>/*: %s", export_web_tree(world.root))
    timings["world"] = time.time() - t0

    t = time.time()
    teacher = train_demo_teacher(world, out, s.teacher_arch, s.teacher_epochs, s.seed, s.batch_size)
    timings["teacher"] = time.time() - t

    truth_rows = read_jsonl(world.truth_path)
    cfg, method_dirs = _distill_all(s, world, teacher, timings)
    run_dir = cfg.run_dir
    results, teacher_top1 = _method_results(method_dirs, truth_rows)

    report_path = None
    if s.report:
        t = time.time()
        report_path = write_report(run_dir)
        timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    summary = {
        "size": s.size, "seed": s.seed, "student": s.student, "epochs": s.epochs,
        "batch_size": cfg.distill.batch_size, "lr": cfg.distill.lr,
        "teacher_arch": s.teacher_arch, "teacher": str(teacher), "teacher_top1": teacher_top1,
        "embed_backend": cfg.curate.embed_backend, "run_dir": str(run_dir),
        "report": None if report_path is None else str(report_path),
        "world": world.counts, "curate": curate_breakdown(run_dir, truth_rows),
        "methods": results, "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "results.json", summary)
    return summary


def _out_dir(result: dict, cfg: RunConfig) -> Path:
    out = Path((result or {}).get("out_dir") or output_dir(cfg))
    if not (out / "metrics.json").is_file():
        raise DataError(f"distill {cfg.distill.method}: no finished output in {out}")
    return out


# ---------------------------------------------------------------- CLI

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demo")
    g.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the world, teacher and run")
    g.add_argument("--size", choices=["tiny", "small", "bench"], default="small",
                   help="world size: tiny (smoke test), small (the demo, ~10 min on 2 CPU cores), bench")
    g.add_argument("--epochs", type=int, help="student epochs (default: per size)")
    g.add_argument("--seed", type=int, default=0, help="seed of the world, the teacher and the students")
    g.add_argument("--student", help="student architecture (default: per size)")
    g.add_argument("--teacher-arch", help="teacher architecture (default: per size)")
    g.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: per size)")
    g.add_argument("--methods", default="kd3,kd,dfnd", help="methods to compare, the first runs in the flow")
    g.add_argument("--clip-weights", type=Path,
                   help="local open_clip weights: curate with CLIP instead of the teacher's embeddings "
                        "(also env KD3_CLIP_WEIGHTS)")
    g.add_argument("--shift", choices=["far", "near"], default="far",
                   help="how far the web sits from the original digits: far (default; 30%% of the web digits "
                        "scan-like) or near (all scan-like)")
    g.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                   help="demo-world setting, e.g. --world scan_fraction=1.0 (the share of scan-like digits: "
                        "the web nearest the original data) or --world 'junk_mix={noise: 2, photo: 1}'")
    g.add_argument("--no-report", action="store_true", help="skip the HTML report")


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags; values read as YAML (numbers, bools, lists, mappings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_override_value(v)
    return out


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: name at least one of kd3, kd, dfnd")
    overrides = _key_values(getattr(args, "set", None) or [], "--set")
    world = {**dw.SHIFTS[getattr(args, "shift", None) or "far"],
             **_key_values(getattr(args, "world", None) or [], "--world")}
    unknown = sorted(set(world) - set(dw.WorldSpec.__dataclass_fields__) | ({"seed"} & set(world)))
    if unknown:
        raise ConfigError(f"--world: unknown setting(s) {unknown} (the seed is --seed)")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    return DemoSettings(out=args.out, size=args.size, seed=args.seed, epochs=args.epochs, student=args.student,
                        teacher_arch=args.teacher_arch, teacher_epochs=args.teacher_epochs, methods=methods,
                        clip_weights=args.clip_weights, overrides=overrides, world=world,
                        report=not args.no_report)


def register(sub) -> None:
    """The ``kd3 demo`` subcommand (found by the CLI through the ``kd3.commands`` entry point)."""
    help_ = "offline end-to-end demo: fake web of digits -> curate -> kd3/kd/dfnd -> report"
    p = sub.add_parser("demo", help=help_, description=help_)
    add_demo_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo run's config, e.g. --set distill.epochs=5")
    p.add_argument("--log-level", default=os.environ.get("KD3_LOG_LEVEL", "INFO"), help="logging level")
    p.set_defaults(handler=demo_cli)


def demo_cli(args) -> int:
    s = settings_from_args(args)
    from flows.server import prefect_api  # heavy (Prefect): only once the demo runs

    with prefect_api():  # kd3's own Prefect server: Ctrl-C stops the demo cleanly, server last
        summary = run_demo(s)
    print()
    print(f"kd3 demo ({summary['size']}, seed {summary['seed']}): student {summary['student']}, "
          f"{summary['epochs']} epochs, teacher {summary['teacher_arch']} "
          f"(top-1 {100 * (summary['teacher_top1'] or 0):.2f}% on the held-out digits), "
          f"curate embeddings: {summary['embed_backend']}")
    print(format_table(summary["methods"]))
    print()
    t = summary["timings_s"]
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    if summary["report"]:
        print(f"report: {summary['report']}")
    print(f"run directory: {summary['run_dir']}   results: {Path(s.out) / 'results.json'}")
    return 0
