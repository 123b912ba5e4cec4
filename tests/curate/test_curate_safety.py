"""Curate must not silently destroy data (issue 13, item 4), on planted pools (kd3demo.planted): distinct
low-detail images (handwritten digits at 32 px) are kept, true copies are removed as copies of their
own original, a threshold that would merge unlike images stops the run, and the summary flags steps
and classes that lose an unusual share."""
import subprocess
import sys
from collections import Counter

import pytest

from curate_fixtures import CrawlWriter, jpeg, make_cfg, stand_in_teacher
from kd3demo.planted import NAMES, distinct_digit, plant, reencode
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import read_jsonl


def _decisions(run):
    return {(r["id"], r["class"]): r for r in read_jsonl(run / "curate" / "decisions.jsonl")}


def _check_pool(p, dec):
    """Every distinct digit kept; every re-encoded copy dropped as a duplicate of its own original."""
    kept_ids = {i for (i, _), r in dec.items() if r["kept"]}
    lost = [(s, dec[(s, t["cls"])]["detail"]) for s, t in p.truth.items()
            if t["kind"] == "distinct" and s not in kept_ids]
    assert not lost, f"{len(lost)} distinct digits dropped, e.g. {lost[:3]}"
    for s, t in p.truth.items():
        if t["kind"] == "reencoded":
            r = dec[(s, t["cls"])]
            assert not r["kept"] and r["reason"] in ("phash_dup", "cross_class_dup") and r["dup_of"] == t["of"], r
    for s, c in p.exact:  # exact copies: folded into the original's row, or dropped under another class
        assert (s, c) not in dec or not dec[(s, c)]["kept"] or dec[(s, c)]["id"] in kept_ids


def test_phash_keeps_distinct_low_detail_digits_and_removes_their_reencodes(tmp_path):
    """1,200 distinct digits collide on pHash (Hamming <= 4) in ~20 pairs; the pixel check tells them
    apart. Before: a pHash match alone dropped them, and upscaled copies won their groups."""
    from pipeline.curate import curate

    run = tmp_path / "runs" / "digits"
    p = plant(run, 1200, 10, 30)
    m = curate(make_cfg(run, classes=NAMES, near_dup_threshold=1.0, batch_size=128))
    _check_pool(p, _decisions(run))
    st = m["stats"]["phash_dedup"]
    assert sum(st["dropped"].values()) == 30 and st["unconfirmed"] >= 5  # colliding digits, not confirmed


def test_an_upscaled_copy_never_wins_over_its_original(tmp_path):
    """Representatives are not chosen by size: a 40x40 re-encode of a 32x32 digit crawled after it is the
    one dropped (before: the highest resolution was kept and the original dropped)."""
    import numpy as np

    from pipeline.curate import curate

    run = tmp_path / "runs" / "up"
    cw = CrawlWriter(run)
    rng = np.random.default_rng(0)
    pairs = []
    for k in (3, 40, 77, 123):
        im, c = distinct_digit(k)
        orig = jpeg(im, 92)
        o = cw.add(NAMES[c], orig, "jpg")
        copy = cw.add(NAMES[c], reencode(orig, rng), "jpg")
        pairs.append((o, copy, NAMES[c]))
    cw.write()
    curate(make_cfg(run, classes=NAMES, near_dup_threshold=1.0))
    dec = _decisions(run)
    for o, copy, c in pairs:
        assert dec[(copy, c)]["w"] > dec[(o, c)]["w"]  # the copy is the bigger file
        assert dec[(o, c)]["kept"] and dec[(copy, c)]["dup_of"] == o, dec[(copy, c)]


def test_near_dup_auto_cut_is_calibrated_on_the_pool(tmp_path, monkeypatch):
    """Teacher embeddings whose cosines are not CLIP's (here a 4x4 colour layout: every digit looks alike):
    the default cut is measured on the pool, keeps every distinct digit and still removes the copies.
    Before: the fixed default 0.95 merged most of the pool."""
    from pipeline.curate import curate

    stand_in_teacher(monkeypatch, list(NAMES))
    run = tmp_path / "runs" / "cal"
    p = plant(run, 400, 5, 10)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in")
    cfg = make_cfg(run, classes=NAMES, embed_backend="teacher")
    cfg.teacher = teacher
    cfg.curate.near_dup_threshold = type(cfg.curate).model_fields["near_dup_threshold"].default  # auto
    m = curate(cfg)
    _check_pool(p, _decisions(run))
    cal = m["stats"]["near_dedup"]["calibration"]
    assert cal["copies"] >= 200 and cal["neighbours_sampled"] == 400
    assert 0.9 < m["stats"]["near_dedup"]["threshold"] == cal["threshold"] <= 1.0
    assert m["stats"]["embed"]["planted_copies"] >= 200


def test_a_cut_that_merges_unlike_images_stops_the_run(tmp_path, monkeypatch):
    """The same embeddings with the old fixed 0.95: near_dedup would drop most of the pool -> DataError
    naming the flags; no shard, manifest or decisions written. Accepting it explicitly runs."""
    from pipeline.curate import curate

    stand_in_teacher(monkeypatch, list(NAMES))
    run = tmp_path / "runs" / "mass"
    plant(run, 200, 0, 0)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in")
    cfg = make_cfg(run, classes=NAMES, embed_backend="teacher", near_dup_threshold=0.95)
    cfg.teacher = teacher
    with pytest.raises(DataError) as e:
        curate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "near_dedup would drop" in msg
    assert "--curate.near_dup_threshold" in msg and "--curate.max_dup_share" in msg
    assert not (run / "manifest.json").exists() and not (run / "curate" / "decisions.jsonl").exists()
    assert not list((run / "shards").glob("*")) if (run / "shards").exists() else True
    cfg.curate.max_dup_share = 1.0
    m = curate(cfg)
    assert m["stats"]["near_dedup"]["out"] < 100


def test_cli_refuses_the_random_clip_mass_merge_in_one_line(tmp_path):
    """The issue's case: the tiny random-weight CLIP with cosine 0.95 took near_dedup 69 -> 2. Now: exit 2,
    one `kd3: error:` line, nothing written."""
    run = tmp_path / "runs" / "tiny"
    plant(run, 120, 0, 0)
    p = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "curate", "--run", str(run),
                        "--classes", ",".join(NAMES), "--curate.clip_model", "kd3-tiny-clip",
                        "--set", "curate.clip_pretrained=null", "--curate.device", "cpu",
                        "--curate.near_dup_threshold", "0.95", "--log-level", "ERROR"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("kd3: error:")]
    assert len(lines) == 1 and "near_dedup would drop" in lines[0] and "Traceback" not in p.stderr
    assert not (run / "manifest.json").exists() and not (run / "curate" / "decisions.jsonl").exists()


def test_random_weights_refused_for_the_calibrated_cut_before_any_work(tmp_path):
    from pipeline.curate import curate

    run = tmp_path / "runs" / "rand"
    plant(run, 5, 0, 0)
    cfg = make_cfg(run, classes=NAMES, near_dup_threshold="auto")
    with pytest.raises(ConfigError) as e:
        curate(cfg)
    msg = str(e.value)
    assert "random/untrained weights" in msg and "--no-curate.near_dup" in msg and "clip_weights" in msg
    assert not (run / "curate").exists()


def test_summary_flags_steps_and_classes_that_lose_an_unusual_share():
    from pipeline.core.records import Decision, DropReason
    from pipeline.curate.outputs import drop_shares

    m = {"classes": ["a", "b", "c"],
         "stats": {"validate": {"in": 100, "out": 95, "dropped": {"invalid": 5}},
                   "phash_dedup": {"in": 95, "out": 60, "dropped": {"phash_dup": 35}}}}
    rows = []
    for cls, n, lost in (("a", 40, 2), ("b", 40, 3), ("c", 20, 16)):
        for k in range(n):
            r = Decision(id=f"{cls}{k}", cls=cls, label=0, path="", url="")
            if k < lost:
                r.drop(DropReason.PHASH_DUP)
            rows.append(r)
    sh = drop_shares(m, rows)
    assert [s["step"] for s in sh["steps"] if s["flag"]] == ["phash_dedup"]
    by = {c["class"]: c for c in sh["classes"]}
    assert by["c"]["flag"] and not by["a"]["flag"] and not by["b"]["flag"]
    assert by["c"]["share"] == 0.8 and by["c"]["dropped"] == {"phash_dup": 16}
    assert Counter(c["kept"] for c in sh["classes"]) == Counter([38, 37, 4])


def test_a_cache_from_before_thumbnails_is_completed_without_re_embedding(world, monkeypatch):
    """facts.jsonl written before the pixel check has no thumbnails: the rerun decodes those images again
    for them (the pHash check needs them) but never re-embeds."""
    import json

    from pipeline.curate import curate
    from pipeline.curate.embed import ClipEmbedder

    run = world["run"]
    m1 = curate(make_cfg(run))
    facts = run / "curate" / "cache" / "facts.jsonl"
    rows = [json.loads(x) for x in facts.read_text().splitlines()]
    facts.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "thumb"}) + "\n" for r in rows))

    def no_embed(self, batch):
        raise AssertionError("re-embedded an image whose embedding is cached")

    monkeypatch.setattr(ClipEmbedder, "embed", no_embed)
    m2 = curate(make_cfg(run))
    assert m2["stats"]["embed"]["computed"] == sum(bool(r.get("ok")) for r in rows) > 0
    assert m2["stats"]["phash_dedup"] == m1["stats"]["phash_dedup"]
    assert all(json.loads(x).get("thumb") for x in facts.read_text().splitlines()[len(rows):])


def test_unrelated_neighbour_search_matches_brute_force(monkeypatch):
    """The calibration's chunked top-k search equals a brute-force one (chunks smaller than the pool)."""
    import numpy as np

    from pipeline.curate import calibrate

    rng = np.random.default_rng(0)
    X = rng.normal(size=(700, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    thumbs = rng.integers(0, 256, size=(700, 256)).astype(np.float32)
    thumbs[1::7] = thumbs[0::7][: len(thumbs[1::7])]  # pixel copies: never "unrelated"
    monkeypatch.setattr(calibrate, "NEIGHBOUR_N", 300)
    ids = [f"{i:064x}" for i in rng.permutation(700)]  # the sample is picked by id, not by row
    held = calibrate.Thumbs(thumbs.astype(np.uint8), np.ones(len(thumbs), bool))
    got = calibrate._unrelated_neighbours(X, held, 4.0, ids, chunk=128)
    q = np.sort(np.argsort(ids)[:300])
    S = X[q] @ X.T
    S[np.arange(len(q)), q] = -np.inf
    diff = np.abs(thumbs[q][:, None, :] - thumbs[None, :, :]).mean(2)
    S[diff <= 4.0] = -np.inf
    assert np.allclose(got, S.max(1), atol=1e-6)
