"""The whole curate stage on a crawl-output run built from real images: decisions for every case,
embeddings, index, shards readable by plain webdataset and wids, manifest format."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.core.io import read_jsonl, sha256_file
from pipeline.core.records import DROP_REASONS


def _decisions(w):
    rows = read_jsonl(w["run"] / "curate" / "decisions.jsonl")
    by_sha = {(r["id"], r["class"]): r for r in rows}

    class By(dict):
        def __getitem__(self, k):
            return by_sha[(w["sha"][k[0]], k[1])]
    return rows, By()


def test_every_case_gets_the_right_decision(curated):
    rows, by = _decisions(curated)
    assert by[("truncated", "cat")]["reason"] == "invalid"
    assert by[("notimage", "coffee")]["reason"] == "invalid"
    assert by[("bomb", "cat")]["reason"] == "bomb"
    assert by[("tiny", "coffee")]["reason"] == "too_small"
    assert by[("pano", "coffee")]["reason"] == "bad_aspect"
    # re-encoded and resized copies: pHash duplicates of the highest-resolution original
    for name in ("chelsea_q60", "chelsea_small"):
        r = by[(name, "cat")]
        assert r["reason"] == "phash_dup" and r["dup_of"] == curated["sha"]["chelsea"]
    assert by[("chelsea", "cat")]["kept"]
    # the same file under two classes: one kept, the other a recorded cross-class conflict
    r = by[("chelsea_in_coffee", "coffee")]
    assert r["reason"] == "cross_class_dup" and r["dup_of"] == curated["sha"]["chelsea"] and "cat" in r["detail"]
    # a resized copy of 'coffee' filed under 'space': pHash duplicate across classes
    r = by[("coffee_in_space_small", "space")]
    assert r["reason"] == "cross_class_dup" and r["dup_of"] == curated["sha"]["coffee"]
    # awkward formats survive as RGB
    for name, cls in (("cmyk", "cat"), ("alpha", "coffee"), ("palette", "coffee"), ("16bit", "coffee"),
                      ("exif", "cat"), ("astronaut", "space"), ("rocket", "space")):
        assert by[(name, cls)]["kept"], (name, by[(name, cls)])
    assert (by[("exif", "cat")]["w"], by[("exif", "cat")]["h"]) == (120, 200)
    # one row per distinct (class, image); reasons from the contract; every row has scores
    assert len({(r["id"], r["class"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["kept"] == (r["reason"] is None)
        assert r["reason"] is None or r["reason"] in DROP_REASONS
        if r["reason"] not in ("invalid", "bomb"):
            assert r["clip_scores"] is not None and len(r["clip_scores"]) == 3
            assert abs(sum(r["clip_scores"]) - 1) < 1e-3 and r["clip_top"] in ("cat", "coffee", "space")
            assert len(r["phash"]) == 16
        if r["kept"]:
            assert r["key"] == r["id"][:16] and r["shard"].startswith("shards/w-")
        else:
            assert r["shard"] is None


def test_manifest_format_and_counts(curated):
    m = curated["manifest"]
    run = curated["run"]
    assert json.loads((run / "manifest.json").read_text()) == json.loads(json.dumps(m))
    assert m["__kind__"] == "wids-shard-index-v1" and m["wids_version"] == 1 and m["name"] == "w"
    assert m["classes"] == ["cat", "coffee", "space"]
    rows, _ = _decisions(curated)
    kept = [r for r in rows if r["kept"]]
    assert m["nsamples"] == len(kept) == sum(m["class_counts"].values())
    assert m["class_counts"]["cat"] == sum(r["class"] == "cat" for r in kept)
    assert len(m["shardlist"]) == -(-len(kept) // 4)  # shard_max_samples=4
    for s in m["shardlist"]:
        p = run / s["url"]
        assert p.is_file() and p.stat().st_size == s["filesize"] and sha256_file(p) == s["sha256"]
        assert 0 < s["nsamples"] <= 4
    st = m["stats"]
    assert st["validate"]["dropped"] == {"invalid": 2, "bomb": 1, "too_small": 1, "bad_aspect": 1}
    for step in ("validate", "exact_dedup", "relevance", "phash_dedup", "near_dedup"):
        assert st[step]["out"] == st[step]["in"] - sum(st[step]["dropped"].values())
    assert st["near_dedup"]["out"] == m["nsamples"]
    assert m["embedding"]["backend"] == "clip" and m["embedding"]["model"] == "kd3-tiny-clip"
    assert m["embedding"]["dim"] == 64 and m["embedding"]["trained"] is False
    assert m["thresholds"]["phash_threshold"] == 4 and len(m["config_hash"]) == 16
    assert "torch" in m["versions"] and m["created"].endswith("+00:00")
    assert not list((run / "shards").glob(".*"))  # no temporary leftovers


def test_shards_readable_by_plain_webdataset(curated):
    import webdataset as wds

    run = curated["run"]
    m = curated["manifest"]
    urls = [str(run / s["url"]) for s in m["shardlist"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    seen = []
    for sample in ds:
        meta = sample["json"]
        assert isinstance(sample["jpg"], Image.Image) and max(sample["jpg"].size) <= 128
        assert int(sample["cls"]) == meta["label"] == m["classes"].index(meta["class"])
        assert sample["__key__"] == meta["sha256"][:16]
        assert set(meta["scores"]) == set(m["classes"])
        seen.append(meta["sha256"])
    rows, _ = _decisions(curated)
    assert sorted(seen) == sorted(r["id"] for r in rows if r["kept"])
    # plain tarfile view: three members per sample
    with tarfile.open(urls[0]) as t:
        names = t.getnames()
    assert len(names) == 3 * m["shardlist"][0]["nsamples"]
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json", "cls"}


def test_manifest_readable_by_wids(curated, tmp_path, monkeypatch):
    import wids

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids_cache"))
    ds = wids.ShardListDataset(str(curated["run"] / "manifest.json"), cache_dir=str(tmp_path / "wc"))
    assert len(ds) == curated["manifest"]["nsamples"]
    s = ds[len(ds) - 1]
    meta, img = s[".json"], s[".jpg"]  # wids decodes by extension (PIL for images)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert meta["sha256"].startswith(s["__key__"]) and int(s[".cls"]) == meta["label"]


def test_embeddings_and_index_readable_without_kd3(curated):
    import faiss

    run = curated["run"]
    E = np.load(run / "curate" / "embeddings.npy")
    ids = json.loads((run / "curate" / "ids.json").read_text())
    assert E.shape == (len(ids), 64) and E.dtype == np.float32
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-4)
    index = faiss.read_index(str(run / "curate" / "index.faiss"))
    kept_ids = json.loads((run / "curate" / "index_ids.json").read_text())
    assert index.ntotal == len(kept_ids) == curated["manifest"]["nsamples"]
    q = E[ids.index(kept_ids[0])][None]
    sim, I = index.search(q, 1)
    assert I[0, 0] == 0 and sim[0, 0] > 0.999
