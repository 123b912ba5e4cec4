"""Load (slow; `make test-slow`): a 200-class x 50-image crawl against 8 fake image hosts + a fake
engine with a per-domain rate limit, and a 20k-image curate. Each runs in a child process that reports
its own peak RSS and thread counts; the numbers are printed (docs/BENCHMARKS.md "Load")."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reliability_helpers import REPO

pytestmark = pytest.mark.slow

N_CLASSES, PER_CLASS, HOSTS = 200, 50, 8

CRAWL_CHILD = """
import json, resource, sys, threading, time
from pipeline.core.config import load_config
from crawlers.stage import crawl
cfg = load_config(None, json.loads(sys.argv[1]))
def live():  # tqdm's one process-wide monitor thread is not a leak: it does not grow with the crawl
    return sum(1 for t in threading.enumerate() if t.name != "tqdm_monitor")
before = live()
t0 = time.monotonic()
s = crawl(cfg)
dt = time.monotonic() - t0
time.sleep(0.5)
after = live()
print(json.dumps({"threads_before": before, "threads_after": after, "seconds": dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "downloaded": sum(c["downloaded"] for c in s["classes"].values()),
                  "done": sum(bool(c["done"]) for c in s["classes"].values())}))
"""


def test_crawl_200_classes_x_50_images(tmp_path):
    from kd3demo.fakeweb import FakeWeb, make_jpeg

    engine = FakeWeb("127.0.0.1").start()
    hosts = [FakeWeb(f"127.0.0.{i + 2}").start() for i in range(HOSTS)]
    try:
        for c in range(N_CLASSES):
            for j in range(PER_CLASS):
                h = hosts[(c * PER_CLASS + j) % HOSTS]
                url = h.add_image(f"c{c}_{j}.jpg", make_jpeg(size=(48, 40), seed=c * PER_CLASS + j))
                engine.add_result(url, [f"class{c:03d}"])
        ov = {"name": "load", "runs_root": str(tmp_path / "runs"), "classes": [f"class{c:03d}" for c in range(N_CLASSES)],
              "crawl.sources": ["bing"], "crawl.engine_urls": engine.engine_urls(),
              "crawl.allowed_networks": ["127.0.0.0/8"], "crawl.query_templates": ["{c}"],
              "crawl.per_class": PER_CLASS, "crawl.threads": 8, "crawl.rate_limit_per_domain": 100.0,
              "crawl.retries": 1, "crawl.backoff_s": 0.05}
        p = subprocess.run([sys.executable, "-c", CRAWL_CHILD, json.dumps(ov)], capture_output=True, text=True,
                           timeout=1800, cwd=REPO, env={"KD3_LOG_LEVEL": "WARNING", **__import__("os").environ})
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        per_host = [sum(1 for r in h.requests if r[2].startswith("/img/")) for h in hosts]
    finally:
        for w in [engine, *hosts]:
            w.stop()
    print(f"\nLOAD crawl {N_CLASSES}x{PER_CLASS}: {res} per-host requests {per_host}")
    assert res["downloaded"] == N_CLASSES * PER_CLASS and res["done"] == N_CLASSES
    assert res["threads_after"] == res["threads_before"]  # no download thread left behind
    assert res["peak_rss_mb"] < 1500, res
    # the per-domain limit held: each host saw at most rate x time requests (+ the first token)
    for n in per_host:
        assert n <= 100.0 * res["seconds"] + 1


CURATE_CHILD = """
import json, resource, sys, time
from pipeline.core.config import load_config
from pipeline.curate import curate
cfg = load_config(None, json.loads(sys.argv[1]))
t0 = time.monotonic()
m = curate(cfg)
print(json.dumps({"seconds": time.monotonic() - t0, "nsamples": m["nsamples"], "shards": len(m["shardlist"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_curate_20k_small_images(tmp_path):
    from PIL import Image

    n, classes = 20_000, [f"c{i}" for i in range(10)]
    run = tmp_path / "runs" / "big"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        b = io.BytesIO()
        Image.fromarray(a).save(b, "JPEG", quality=80)
        data = b.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        rel = f"crawl/images/{sha[:2]}/{sha}.jpg"
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
        rows.append({"class": classes[i % 10], "query": classes[i % 10], "engine": "bing", "url": f"http://x/{i}.jpg",
                     "status": "ok", "error": None, "sha256": sha, "bytes": len(data), "w": 40, "h": 40,
                     "path": rel, "time": time.time()})
    (run / "crawl" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = {"name": "big", "runs_root": str(run.parent), "classes": classes, "curate.clip_model": "kd3-tiny-clip",
          "curate.clip_pretrained": None, "curate.device": "cpu", "curate.workers": 2, "curate.batch_size": 256,
          "curate.min_side": 32, "curate.phash_threshold": 0, "curate.near_dup_threshold": 0.9999,
          "curate.shard_max_samples": 5000}
    p = subprocess.run([sys.executable, "-c", CURATE_CHILD, json.dumps(ov)], capture_output=True, text=True,
                       timeout=3000, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"\nLOAD curate {n}: {res}")
    assert res["nsamples"] > 0.9 * n
    assert res["peak_rss_mb"] < 3000, res
