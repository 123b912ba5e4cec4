"""Disk full while writing shards: a clean one-line failure, no partial shard, no manifest; after space
is freed the same command completes with the counts of an undisturbed run.

Two ways to run out of space: a real 1-2 MB tmpfs (needs root and `mount`; skipped otherwise) and a
size-capped writer that works anywhere (RLIMIT_FSIZE: writing past the cap fails with EFBIG)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from reliability_helpers import REPO, assert_one_line_error, load_module

cf = load_module("tests/curate/curate_fixtures.py", "curate_fixtures")
FT = load_module("tests/reliability/test_faults_curate.py", "kd3_rel_faults_curate")

ARGS = ["--classes", "cat,coffee,space", "--curate.clip_model", "kd3-tiny-clip", "--set", "curate.clip_pretrained=null",
        "--curate.batch_size", "4", "--curate.workers", "1", "--curate.device", "cpu", "--curate.max_side", "128",
        "--curate.near_dup_threshold", "0.9995", "--curate.shard_max_samples", "100", "--log-level", "ERROR"]

CAPPED = """
import resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))   # any file growing past `cap` bytes: EFBIG
sys.argv = ["kd3", "curate", "--run", sys.argv[2]] + sys.argv[3:]
from pipeline.app.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from pipeline.curate import curate

    w = cf.build_world(tmp_path_factory.mktemp("ref"))
    m = curate(cf.make_cfg(w["run"], batch_size=4, shard_max_samples=100))
    other = max(p.stat().st_size for p in w["run"].rglob("*") if p.is_file() and "shards" not in p.parts
                and "crawl" not in p.parts)
    return {"counts": FT._counts(m), "shard_bytes": m["shardlist"][0]["filesize"], "largest_other": other}


def _after_failure(run: Path, r) -> None:
    assert_one_line_error(r)
    assert not (run / "manifest.json").exists()
    shards = run / "shards"
    assert not shards.exists() or list(shards.iterdir()) == [], list(shards.iterdir())


def test_size_capped_writer(tmp_path, reference):
    from pipeline.curate import curate

    assert reference["largest_other"] < reference["shard_bytes"]
    cap = (reference["largest_other"] + reference["shard_bytes"]) // 2
    run = cf.build_world(tmp_path)["run"]
    r = subprocess.run([sys.executable, "-c", CAPPED, str(cap), str(run), *ARGS], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    _after_failure(run, r)
    assert "too large" in r.stderr.lower()
    m = curate(cf.make_cfg(run, batch_size=4, shard_max_samples=100))  # no cap: completes
    assert FT._counts(m) == reference["counts"]
    FT.check_whole(run, m)


def test_full_tmpfs(tmp_path, reference):
    src = cf.build_world(tmp_path / "src")["run"]
    need = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size_kb = (need + reference["largest_other"] * 8 + reference["shard_bytes"] * 3) // 1024 + 256
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", f"kd3rel{uuid.uuid4().hex[:6]}", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({m.stderr.strip()[:100]}); the size-capped test covers it")
    try:
        run = mnt / "runs" / "w"
        shutil.copytree(src, run)
        # fill the disk up to about half a shard
        free = shutil.disk_usage(mnt).free
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(0, free - reference["largest_other"] * 4 - reference["shard_bytes"] // 2))
        r = subprocess.run([str(Path(sys.executable).parent / "kd3"), "curate", "--run", str(run), *ARGS],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        _after_failure(run, r)
        assert "No space left on device" in r.stderr
        filler.unlink()  # space freed: the same command completes
        r2 = subprocess.run([str(Path(sys.executable).parent / "kd3"), "curate", "--run", str(run), *ARGS],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r2.returncode == 0, r2.stderr[-2000:]
        import json

        man = json.loads((run / "manifest.json").read_text())
        assert FT._counts(man) == reference["counts"]
        FT.check_whole(run, man)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
