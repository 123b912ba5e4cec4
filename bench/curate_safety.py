"""Curate on a planted pool (kd3demo.planted): how many distinct images it keeps and how many planted
copies it removes, per step. Numbers for docs/BENCHMARKS.md (Curate); no assertions (the test suite
runs a smaller pool: tests/curate/test_curate_safety.py).

    .venv/bin/python -m kd3demo.world --out /tmp/w --size small
    .venv/bin/kd3 teacher train --data /tmp/w/original/train --arch cnn_small --out /tmp/teacher.pt --epochs 15
    .venv/bin/python bench/curate_safety.py --teacher /tmp/teacher.pt                  # 5,000 + 100 + 100
    .venv/bin/python bench/curate_safety.py --teacher /tmp/teacher.pt --set curate.near_dup_threshold=0.95
    .venv/bin/python bench/curate_safety.py --backend clip                             # tiny random CLIP

Only config keys that every kd3 version has are set by default, so the same script measures an older
checkout (``PYTHONPATH=<old checkout> python bench/curate_safety.py ...``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(planted, run: Path) -> dict:
    """Distinct originals kept, re-encoded copies removed (as duplicates of their own original)."""
    from pipeline.core.io import read_jsonl

    rows = read_jsonl(run / "curate" / "decisions.jsonl")
    by = {(r["id"], r["class"]): r for r in rows}
    kept_ids = {r["id"] for r in rows if r["kept"]}  # an exact copy filed under another class may win
    t = planted.truth
    distinct = [by[(s, v["cls"])] for s, v in t.items() if v["kind"] == "distinct"]
    copies = [(by[(s, v["cls"])], v["of"]) for s, v in t.items() if v["kind"] == "reencoded"]
    lost = Counter(r["reason"] for r in distinct if r["id"] not in kept_ids)
    return {"distinct": len(distinct), "distinct_kept": sum(r["id"] in kept_ids for r in distinct),
            "distinct_lost_by_reason": dict(lost),
            "reencoded": len(copies), "reencoded_removed": sum(not r["kept"] for r, _ in copies),
            "reencoded_removed_as_copy_of_original": sum((not r["kept"]) and r["dup_of"] == of for r, of in copies),
            "exact_rows": len(planted.exact)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distinct", type=int, default=5000)
    ap.add_argument("--exact", type=int, default=100)
    ap.add_argument("--reencoded", type=int, default=100)
    ap.add_argument("--backend", choices=["teacher", "clip"], default="teacher")
    ap.add_argument("--teacher", type=Path, help="teacher checkpoint for --backend teacher")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kd3demo.planted import NAMES, plant
    from pipeline.core.config import load_config, parse_override_value
    from pipeline.core.errors import Kd3Error
    from pipeline.curate import curate

    root = a.out or Path(tempfile.mkdtemp(prefix="kd3-safety-"))
    run = root / "runs" / "planted"
    planted = plant(run, a.distinct, a.exact, a.reencoded)
    ov = {"name": "planted", "runs_root": str(run.parent), "classes": list(NAMES), "curate.device": "cpu",
          "curate.workers": 2, "curate.batch_size": 128}
    if a.backend == "teacher":
        if a.teacher is None:
            ap.error("--backend teacher needs --teacher (see the module docstring for how to train one)")
        ov.update({"teacher": str(a.teacher), "curate.embed_backend": "teacher"})
    else:
        ov.update({"curate.clip_model": "kd3-tiny-clip", "curate.clip_pretrained": None})
    for item in a.set:
        k, v = item.split("=", 1)
        ov[k] = parse_override_value(v)
    t0 = time.perf_counter()
    try:
        m = curate(load_config(None, ov))
    except Kd3Error as e:
        print(f"kd3: error: {e}")
        out = {"error": str(e), "overrides": a.set}
    else:
        out = {**score(planted, run), "overrides": a.set, "seconds": round(time.perf_counter() - t0, 1),
               "stats": {k: {"in": v["in"], "out": v["out"], "dropped": v["dropped"],
                             **({"threshold": v["threshold"]} if "threshold" in v else {}),
                             **({"calibration": v["calibration"]} if "calibration" in v else {})}
                         for k, v in m["stats"].items() if k in ("exact_dedup", "phash_dedup", "near_dedup")}}
        print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
