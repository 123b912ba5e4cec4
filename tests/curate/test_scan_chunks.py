"""The scan in chunks (issue 21, part 3): chunks run anywhere and write only files of their own; the
chunk size changes no decision; a killed chunk's finished rows and batches are kept, a torn row or a
half-written part is not; a worker with another model, or whose results the run cannot see, stops it.

The chunk size, like the batch size, decides which images share an embedding batch, and a model's float
results can move in the last bit with its batch (scores are stored to 6 places): runs with other chunk
sizes are compared by decision, runs with the same one (tests/flows/test_curate_dask.py) byte for byte."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from curate_fixtures import build_world, make_cfg
from pipeline.core.errors import DataError


def _decided(run) -> dict:
    from pipeline.core.records import read_decisions

    rows = read_decisions(run / "curate" / "decisions.jsonl")
    return {"decisions": sorted((d.cls, d.id, d.kept, d.reason.value if d.reason else None, d.dup_of, d.key, d.shard)
                                for d in rows),
            "ids": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("curate/*ids.json"))}}


def _copy(world_run, dest):
    shutil.copytree(world_run / "crawl", dest / "crawl")
    return dest


def test_chunk_size_changes_no_decision(tmp_path):
    from pipeline.curate import curate

    w = build_world(tmp_path / "a")
    one = curate(make_cfg(w["run"], shard_max_samples=4))
    run_b = _copy(w["run"], tmp_path / "b" / "runs" / "w")
    many = curate(make_cfg(run_b, shard_max_samples=4, scan_chunk=3))
    assert one["stats"]["embed"]["chunks"] == 1 and many["stats"]["embed"]["chunks"] == 7
    assert _decided(run_b) == _decided(w["run"])
    assert many["stats"]["embed"]["computed"] == one["stats"]["embed"]["computed"] == 20


def test_killed_chunk_keeps_what_it_finished(tmp_path):
    """Chunk 1 ran whole, chunk 2 was killed after two rows (a torn third row, a half-written embedding
    part): the rerun scans only the rest, and decides as an uninterrupted run does."""
    from pipeline.curate import curate
    from pipeline.curate.scan import plan_chunks, scan_chunk
    from pipeline.curate.stage import prepare

    w = build_world(tmp_path / "ref")
    ref = curate(make_cfg(w["run"], shard_max_samples=4, scan_chunk=5))
    run = _copy(w["run"], tmp_path / "killed" / "runs" / "w")
    cfg = make_cfg(run, shard_max_samples=4, scan_chunk=5)
    job = prepare(cfg)
    chunks = plan_chunks(job.items, cfg.curate, job.embedder, job.ctx.facts, job.ctx.emb, job.cache, job.ctx.classes)
    for ch in chunks[:2]:
        scan_chunk(ch, cfg.curate, job.embedder)
    torn = chunks[1].facts_path()
    lines = torn.read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:2]) + lines[2][:40])                    # killed while writing row 3
    emb_dir = job.ctx.emb.dir
    (emb_dir / ".part-torn.npz.1234.tmp").write_bytes(b"half a part")     # an unfinished atomic write

    m = curate(cfg)
    assert m["stats"]["embed"]["computed"] == 20 - 5 - 2
    assert not list(torn.parent.glob("*"))                                  # merged into facts.jsonl
    assert _decided(run) == _decided(w["run"])
    assert m["nsamples"] == ref["nsamples"] and m["class_counts"] == ref["class_counts"]


def test_a_worker_with_another_model_is_refused(world):
    from dataclasses import replace

    from pipeline.curate.scan import plan_chunks, scan_chunk
    from pipeline.curate.stage import prepare

    cfg = make_cfg(world["run"])
    job = prepare(cfg)
    ch = plan_chunks(job.items, cfg.curate, job.embedder, job.ctx.facts, job.ctx.emb, job.cache, job.ctx.classes)[0]
    with pytest.raises(DataError, match="same model files"):
        scan_chunk(replace(ch, key="clip:other-model|v2:side224"), cfg.curate, job.embedder)


def test_chunk_results_out_of_sight_stop_the_run(world):
    """Workers that wrote their results where this run cannot see them (no shared storage): one line, no
    decisions written."""
    from pipeline.curate import curate

    with pytest.raises(DataError, match="shared storage"):
        curate(make_cfg(world["run"], scan_chunk=8), map_chunks=lambda chunks: [{} for _ in chunks])
    assert not (world["run"] / "curate" / "decisions.jsonl").exists()


def test_facts_cache_keeps_rows_as_text_last_row_wins_and_a_read_is_a_copy(tmp_path):
    """The facts table holds a row per image as its JSON text (a third of a dict's memory at 10^6 images):
    what is read back equals what was added, across a reload; the last row of a sha wins; changing a row
    read from it changes nothing until it is assigned back."""
    from pipeline.curate.scan import FactsCache

    path = tmp_path / "facts.jsonl"
    facts = FactsCache(path)
    facts.add({"sha": "a" * 64, "ok": True, "w": 32, "h": 32, "phash": "8f3861ce9cb0b365", "thumb": "FxQW"})
    facts.add({"sha": "b" * 64, "ok": False, "error": "truncated"})
    facts.add({"sha": "a" * 64, "ok": True, "w": 40, "h": 40, "phash": "8f3861ce9cb0b365", "thumb": "FxQW"})
    facts.close()
    row = facts.rows["a" * 64]
    row["w"] = 1
    assert facts.rows["a" * 64]["w"] == 40
    again = FactsCache(path)
    assert len(again.rows) == 2 and "b" * 64 in again.rows and "c" * 64 not in again.rows
    assert again.rows.get("a" * 64) == facts.rows.get("a" * 64) == {"sha": "a" * 64, "ok": True, "w": 40, "h": 40,
                                                                    "phash": "8f3861ce9cb0b365", "thumb": "FxQW"}
    assert again.rows.get("c" * 64, {}) == {}
    with pytest.raises(KeyError):
        again.rows["c" * 64]
    # held without its keys: the same keys in the same order come back, a "sha" that is not the row's own
    # (or none) too
    assert list(again.rows["a" * 64]) == ["sha", "ok", "w", "h", "phash", "thumb"]
    assert list(again.rows["b" * 64]) == ["sha", "ok", "error"]
    again.rows["d" * 64] = {"ok": True, "sha": "e" * 64}
    again.rows["f" * 64] = {"w": None, "ok": False}
    assert list(again.rows["d" * 64].items()) == [("ok", True), ("sha", "e" * 64)]
    assert again.rows["f" * 64] == {"w": None, "ok": False} and "sha" not in again.rows["f" * 64]


def test_embedding_cache_blocks_read_back_in_any_order_first_row_of_a_sha_wins(tmp_path):
    """The embedding cache holds its rows as one block per part (no array per image): matrix() gathers any
    order of shas across parts, a sha met again in a later part keeps its first row, the extra outputs
    (teacher probabilities) follow their rows, and a reload reads the same."""
    from pipeline.curate.embed import EmbeddingCache

    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    x1, x2 = rng.random((3, 2)).astype(np.float32), rng.random((3, 2)).astype(np.float32)
    cache = EmbeddingCache(tmp_path, "k")
    cache.add_part(["a", "b", "c"], e1, x1)
    cache.add_part(["d", "b", "e"], e2, x2)  # "b" again: its first row stays
    cache.add_part(["p"], e2[:1], None)        # a part without extra outputs
    want = {"a": e1[0], "b": e1[1], "c": e1[2], "d": e2[0], "e": e2[2], "p": e2[0]}
    for c in (cache, EmbeddingCache(tmp_path, "k")):
        assert len(c) == 6 and "b" in c and "z" not in c
        order = ["e", "a", "p", "b", "d", "c", "a"]
        assert np.array_equal(c.matrix(order), np.stack([want[s] for s in order]))
        assert np.array_equal(c.get("d"), e2[0])
        assert np.array_equal(c.extra_of("b"), x1[1]) and np.array_equal(c.extra_of("e"), x2[2])
        assert c.extra_of("p") is None and c.extra_of("z") is None
