"""kill -9 during curate (embedding, index, shard writing, just before the manifest) at a random call,
then rerun: the manifest's counts equal an uninterrupted run's, and no file under a final name is
half written (every shard matches its sha256, every JSON parses, the index and embeddings load)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import REPO, load_module

cf = load_module("tests/curate/curate_fixtures.py", "curate_fixtures")

SEED = int(os.environ.get("KD3_FAULT_SEED", random.SystemRandom().randrange(10**6)))

KILLER = """
import os, random, sys
target, nth = sys.argv[1], int(sys.argv[2])
mod_name, _, attr = target.rpartition(".")
import importlib
if mod_name.endswith("EmbeddingCache") or mod_name.endswith("_OpenShard"):
    mod_name, cls_name = mod_name.rsplit(".", 1)
    owner = getattr(importlib.import_module(mod_name), cls_name)
else:
    owner = importlib.import_module(mod_name)
real = getattr(owner, attr)
calls = [0]
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), 9)      # before the call: nothing of it is written
    out = real(*a, **k)
    return out
setattr(owner, attr, hooked)
sys.argv = ["kd3", "curate", "--run", sys.argv[3], "--classes", "cat,coffee,space",
            "--curate.clip_model", "kd3-tiny-clip", "--set", "curate.clip_pretrained=null",
            "--curate.batch_size", "4", "--curate.workers", "1", "--curate.device", "cpu",
            "--curate.max_side", "128", "--curate.near_dup_threshold", "0.9995", "--curate.shard_max_samples", "3"]
from pipeline.app.cli import main
sys.exit(main())
"""

# (hook, how many calls a full run makes at most): the kill happens at a random one of them
POINTS = {
    "embedding": ("pipeline.curate.embed.EmbeddingCache.add_part", 5),
    "shard_member": ("pipeline.curate.shards._OpenShard.add", 10),
    "index_save": ("pipeline.core.records.write_index", 1),
    "manifest": ("pipeline.core.records.write_manifest", 1),
}


def _counts(m: dict) -> dict:
    return {"nsamples": m["nsamples"], "class_counts": m["class_counts"],
            "shards": [s["nsamples"] for s in m["shardlist"]],
            "dropped": {k: v.get("dropped") for k, v in m["stats"].items() if isinstance(v, dict)}}


def check_whole(run: Path, manifest: dict) -> None:
    """Nothing under a final name is half written."""
    import numpy as np

    from distill.data import verify_shards
    from pipeline.core.records import read_index as load_index

    verify_shards(run / "manifest.json", manifest)
    for p in run.rglob("*.json"):
        if not p.name.startswith("."):
            json.loads(p.read_text())
    for p in run.rglob("*.jsonl"):
        for line in p.read_text().splitlines():
            json.loads(line)
    for p in run.rglob("*.npy"):
        if not p.name.startswith("."):
            np.load(p)
    load_index(run / "curate" / "index.faiss", run / "curate" / "index_ids.json")
    listed = {Path(s["url"]).name for s in manifest["shardlist"]}
    assert {p.name for p in (run / "shards").iterdir()} == listed  # no stray or temp shard


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from pipeline.curate import curate

    w = cf.build_world(tmp_path_factory.mktemp("ref"))
    return _counts(curate(cf.make_cfg(w["run"], batch_size=4, shard_max_samples=3)))


@pytest.mark.parametrize("point", list(POINTS))
def test_kill9_during_curate_then_rerun(tmp_path, reference, point):
    from pipeline.curate import curate

    rng = random.Random(f"{SEED}-{point}")
    target, most = POINTS[point]
    nth = rng.randint(1, most)
    w = cf.build_world(tmp_path)
    run = w["run"]
    p = subprocess.run([sys.executable, "-c", KILLER, target, str(nth), str(run)], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert p.returncode == -9, f"seed {SEED} point {point} nth {nth}: {p.returncode} {p.stderr[-2000:]}"
    assert not (run / "manifest.json").exists()  # the manifest is the last thing written
    m = curate(cf.make_cfg(run, batch_size=4, shard_max_samples=3))
    assert _counts(m) == reference, f"seed {SEED} point {point} nth {nth}"
    check_whole(run, m)
