"""Curate across machines (issue 21, part 3): the curate flow on a Dask LocalCluster of 2 worker processes,
its scan in several chunk tasks (and the near-dup calibration's planted copies in one more), gives what one
process gives: the same decisions, manifest (but for its timings), shards, index and embeddings; a rerun
is a cache hit that starts no chunk."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("prefect_dask")

TIMINGS = ("created", "elapsed_s")          # when and how long: differ between any two runs
SCAN_TIMINGS = ("wall_s", "model_s", "img_per_s")


def _pool(src: Path, dest: Path) -> Path:
    """The flows' digit folder plus the awkward cases: a copy under another class, a copy under the same
    class, a file that is not an image."""
    shutil.copytree(src, dest)
    first = sorted((dest / "zero").iterdir())[0]
    shutil.copy(first, dest / "one" / "copy_of_zero.png")
    shutil.copy(first, dest / "zero" / "again.png")
    (dest / "two" / "broken.png").write_bytes(b"<html>not an image</html>")
    return dest


def _outputs(run: Path) -> dict:
    m = json.loads((run / "manifest.json").read_text())
    for k in TIMINGS:
        m.pop(k)
    for k in SCAN_TIMINGS:
        m["stats"]["embed"].pop(k)
    digest = {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for rel in ("shards/*.tar", "curate/*.faiss", "curate/*.json", "curate/*.npy", "curate/decisions.jsonl")
              for p in sorted(run.glob(rel))}
    return {"manifest": json.dumps(m, sort_keys=True), "files": digest}


def _scan_chunk_runs() -> Counter:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return Counter((t.name.rsplit("-", 1)[0], t.state_name) for t in c.read_task_runs(limit=200)
                       if t.name.startswith("scan-"))


def test_curate_on_two_dask_processes_equals_one_process(prefect_env, make_cfg, digits_folder, tmp_path):
    from flows.stages import curate as curate_flow
    from pipeline.curate import curate

    folder = _pool(digits_folder, tmp_path / "pool")
    over = {"crawl.folder": str(folder), "curate.scan_chunk": 8, "curate.workers": 1, "flow.task_runner": "dask",
            "curate.near_dup_threshold": "auto", "flow.dask_workers": 2, "flow.dask_processes": True}
    one = make_cfg("fanout", runs_root=str(tmp_path / "one"), **over)
    fan = make_cfg("fanout", runs_root=str(tmp_path / "dask"), **over)
    for cfg in (one, fan):
        Path(cfg.run_dir).mkdir(parents=True)

    m1 = curate(one)                      # `kd3 curate`: every chunk in this process
    before = _scan_chunk_runs()
    r = curate_flow(fan)                  # the flow: 5 + 1 chunk tasks on 2 worker processes, the reduce here
    ran = _scan_chunk_runs() - before
    assert r["cached"] is False
    assert m1["stats"]["embed"]["chunks"] == 5
    assert ran == Counter({("scan-images", "Completed"): 5, ("scan-planted", "Completed"): 1})
    assert m1["stats"]["embed"]["planted_copies"] == 36 and m1["stats"]["near_dedup"]["calibration"]["copies"] == 36
    assert m1["stats"]["exact_dedup"]["dropped"] == {"exact_dup": 1, "cross_class_dup": 1}  # something to decide
    assert m1["stats"]["validate"]["dropped"] == {"invalid": 1}
    assert _outputs(Path(fan.run_dir)) == _outputs(Path(one.run_dir))
    assert not list(Path(fan.run_dir, "curate", "cache", "facts-parts").glob("*"))  # merged into facts.jsonl

    again = curate_flow(fan)              # unchanged input and code: the curate task is a cache hit
    assert again["cached"] is True and _scan_chunk_runs() - before == ran
