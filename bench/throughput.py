"""Throughput benchmark: the curate and distill benchmarks' tables, printed together.

* ``bench/curate_bench.py`` (curate area): curate img/s vs raw embedding img/s (their ratio), and
  near-duplicate removal time at 100k / 1M embeddings.
* ``bench/distill_bench.py`` (distill area): kd3 / kd epoch-time ratio and img/s.

Each is imported and its ``main(argv)`` called in turn, so each keeps its own flags and defaults:

    .venv/bin/python bench/throughput.py                 # both, default sizes
    .venv/bin/python bench/throughput.py --only curate   # one of them
    .venv/bin/python bench/throughput.py --curate-args "--n 2000" --distill-args "--epochs 2"
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

BENCHES = {"curate": HERE / "curate_bench.py", "distill": HERE / "distill_bench.py"}


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"kd3_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kd3 throughput: curate and distill benchmarks")
    ap.add_argument("--only", choices=sorted(BENCHES), help="run one benchmark")
    ap.add_argument("--curate-args", default="", help="arguments passed to bench/curate_bench.py")
    ap.add_argument("--distill-args", default="", help="arguments passed to bench/distill_bench.py")
    a = ap.parse_args(argv)
    rc = 0
    for name, path in BENCHES.items():
        if a.only and name != a.only:
            continue
        print(f"\n==================== {name}: {path.relative_to(HERE.parent)} ====================", flush=True)
        if not path.is_file():
            print(f"{path.name} is not in this checkout; skipped")
            rc = rc or 1
            continue
        mod = load(name, path)
        entry = getattr(mod, "main", None)
        if entry is None:
            print(f"{path.name} has no main(argv); skipped")
            rc = rc or 1
            continue
        t = time.time()
        code = entry(shlex.split(getattr(a, f"{name}_args")))
        print(f"({name} benchmark took {time.time() - t:.0f}s)", flush=True)
        rc = rc or int(code or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
