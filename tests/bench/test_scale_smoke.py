"""``bench/scale.py --quick`` as CI's smoke test of the scale bench, at 2,000 images (--quick alone is 10k,
about 2.5 min on 2 cores: too long for ``make test``): every stage runs, exits 0 and prints its numbers.
The bench asserts nothing about time; neither does this test. (The teacher keeps its 200 steps: with 20 it
leaves classes without an image, and the crawl exits 1 for a class it could not fill.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("crawl", "curate", "distill-kd3", "distill-kd", "inspect", "inspect-html")


def test_scale_bench_quick_runs_every_stage_and_prints_a_row_each(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--sizes", "2000",
                        "--keep", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    num = r"\d+(?:\.\d+)?"
    for stage in STAGES:  # | stage | s/1k (CPU s/1k), RSS MB, MB written | exponent wall (CPU) | RSS growth |
        row = rf"^\| {stage} \| {num} \({num}\), {num}, {num} \| – \(–\) \| – \|$"
        assert re.search(row, p.stdout, re.M), (stage, p.stdout)
    assert re.search(r"selection\.jsonl: .*kd3 [\d,]+ B", p.stdout)
    assert re.search(r"report: [\d.]+ MB in \d+ files", p.stdout)
