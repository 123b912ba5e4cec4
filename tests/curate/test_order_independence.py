"""Curate is a function of its input (issue 21, part 5): the same crawl gives the same decisions, the same
near-dup cut and the same shard bytes whatever order its records are in (they are read in crawl-time
order) and whatever the run is called."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from curate_fixtures import build_world, make_cfg


def _rerecorded(src_run, dest_run, seed: int):
    """The same crawl output in another run directory, its records shuffled."""
    shutil.copytree(src_run / "crawl", dest_run / "crawl")
    lines = (src_run / "crawl" / "records.jsonl").read_text().splitlines(keepends=True)
    random.Random(seed).shuffle(lines)
    (dest_run / "crawl" / "records.jsonl").write_text("".join(lines))
    return dest_run


def _outcome(run, manifest: dict) -> dict:
    from pipeline.core.records import read_decisions

    rows = read_decisions(run / "curate" / "decisions.jsonl")
    return {
        "decisions": sorted((d.cls, d.id, d.kept, d.reason.value if d.reason else None, d.dup_of, d.key) for d in rows),
        "shards": [(s["nsamples"], s["sha256"]) for s in manifest["shardlist"]],
        "class_counts": manifest["class_counts"],
        "near_dup": json.dumps(manifest["stats"]["near_dedup"], sort_keys=True),
    }


@pytest.mark.parametrize("backend", ["clip", "teacher"])
def test_record_order_and_run_name_change_nothing(tmp_path, monkeypatch, backend):
    from curate_fixtures import stand_in_teacher

    from pipeline.curate import curate

    classes = ["cat", "coffee", "space"]
    extra = {}  # random-weight CLIP: a fixed cut; the teacher: the cut calibrated on the pool
    if backend == "teacher":
        stand_in_teacher(monkeypatch, classes)
        teacher = tmp_path / "teacher.pt"
        teacher.write_bytes(b"stand-in")
        extra.update(embed_backend="teacher", near_dup_threshold="auto")
    w = build_world(tmp_path / "a")
    outcomes = []
    for i, run in enumerate([w["run"], *(_rerecorded(w["run"], tmp_path / f"b{s}" / "runs" / f"other{s}", s)
                                         for s in (1, 2))]):
        cfg = make_cfg(run, shard_max_samples=4, **extra)
        if backend == "teacher":
            cfg = cfg.model_copy(update={"teacher": teacher})
            import torch

            torch.manual_seed(1)  # the stand-in's classifier is drawn when loaded: the same teacher each run
        outcomes.append(_outcome(run, curate(cfg)))
        if i:  # really another order
            assert (run / "crawl" / "records.jsonl").read_text() != (w["run"] / "crawl" / "records.jsonl").read_text()
    assert outcomes[1] == outcomes[0]
    assert outcomes[2] == outcomes[0]


def test_a_cut_at_the_top_of_the_scale_says_so():
    """Features that collapse (unrelated images on one embedding) put the calibrated cut at cosine 1.0: the
    calibration says so (manifest: stats.near_dedup.calibration.at_top); a cut below it does not."""
    import numpy as np

    from pipeline.curate.calibrate import calibrate
    from pipeline.curate.hashing import Thumbs

    rng = np.random.default_rng(0)
    thumbs = Thumbs(rng.integers(0, 255, (40, 256)).astype(np.uint8), np.ones(40, bool))  # 40 unrelated ones
    collapsed = np.tile(np.eye(8, dtype=np.float32)[:1], (40, 1))     # ... on one and the same feature
    ids = [f"{i:064x}" for i in range(40)]
    top = calibrate(collapsed, thumbs, np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32), 4.0, ids)
    assert top["threshold"] == 1.0 and top["at_top"] is True
    spread = rng.normal(size=(40, 8)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    low = calibrate(spread, thumbs, np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32), 4.0, ids)
    assert low["threshold"] < 0.9999 and low["at_top"] is False
