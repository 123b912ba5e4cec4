"""Existing pools as crawl sources (issue 21, part 1): ``webdataset`` shards and ``arrays`` files, each image
stored once, assigned a class by the teacher (or CLIP), bad samples recorded with their reason, resumable, and
bad input refused in one line before any work."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.app import cli
from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.core.io import read_jsonl

torch.set_num_threads(1)
CLASSES = ["digit0", "digit1", "digit2", "digit3"]


def _cfg(world, tmp_path, **crawl):
    return load_config(None, {"name": "pool", "runs_root": str(tmp_path / "runs"), "teacher": str(world["teacher"]),
                              "curate.device": "cpu", "curate.batch_size": 32,
                              **{f"crawl.{k}": v for k, v in crawl.items()}})


def _records(tmp_path):
    return read_jsonl(tmp_path / "runs" / "pool" / "crawl" / "records.jsonl")


def _images(tmp_path):
    return sorted(p for p in (tmp_path / "runs" / "pool" / "crawl" / "images").rglob("*") if p.is_file())


def _png(pixels) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(pixels).save(b, "PNG")
    return b.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def test_arrays_pool_assigned_by_the_teacher_stored_once_and_resumable(digits_world, digit_pixels, tmp_path):
    from crawlers.stage import crawl

    imgs, labels = digit_pixels
    npy = tmp_path / "pool.npy"
    np.save(npy, np.concatenate([imgs, imgs[:5]]))  # five rows twice: stored once
    cfg = _cfg(digits_world, tmp_path, sources=["arrays"], arrays=[str(npy)])
    assert cfg.crawl.target() is None  # a pool is taken whole unless per_class caps it
    summary = crawl(cfg)
    rows = _records(tmp_path)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(rows) == 85 and len(ok) == 80 and all(r["engine"] == "arrays" for r in rows)
    assert {r["query"] for r in rows} == {"assign:teacher"}
    assert len(_images(tmp_path)) == 80  # content-addressed: the repeated rows are one file each
    row_of = {r["url"]: r for r in rows}
    uri = npy.resolve().as_uri()
    agree = sum(row_of[f"{uri}#{i}"]["class"] == CLASSES[labels[i]] for i in range(80) if f"{uri}#{i}" in row_of)
    assert agree >= 72  # the teacher's argmax is the true digit for ~97 % of its eval images
    assert sum(s["downloaded"] for s in summary["classes"].values()) == 80
    mtimes = {p: p.stat().st_mtime_ns for p in _images(tmp_path)}
    crawl(cfg)  # a rerun: nothing new recorded, nothing written again
    assert len(_records(tmp_path)) == 85 and {p: p.stat().st_mtime_ns for p in _images(tmp_path)} == mtimes


def test_per_class_keeps_each_class_top_k_by_the_teacher_score(digits_world, digit_pixels, tmp_path):
    from crawlers.stage import crawl

    imgs, _ = digit_pixels
    npz = tmp_path / "pool.npz"
    np.savez(npz, images=imgs)
    cfg = _cfg(digits_world, tmp_path, sources=["arrays"], arrays=[str(npz)], per_class=5)
    crawl(cfg)
    ok = [r for r in _records(tmp_path) if r["status"] == "ok"]
    assert Counter(r["class"] for r in ok) == {c: 5 for c in CLASSES}
    pool = [json.loads(ln) for f in (tmp_path / "runs" / "pool" / "crawl" / "pools").glob("*.jsonl")
            for ln in f.read_text().splitlines()]
    assert len(pool) == 80
    for c in CLASSES:
        scores = sorted((p["score"] for p in pool if p["class"] == c), reverse=True)
        got = sorted(p["score"] for p in pool if p["id"] in {r["url"] for r in ok if r["class"] == c})
        assert sorted(got, reverse=True) == scores[:5], c


def test_webdataset_shards_with_provenance_and_bad_samples_recorded(digits_world, digit_pixels, tmp_path):
    from crawlers.stage import crawl

    imgs, _ = digit_pixels
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        members = []
        for i in range(20 * s, 20 * s + 20):
            key = f"{i:06d}"
            members += [(f"{key}.png", _png(imgs[i])), (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg"}).encode()),
                        (f"{key}.txt", b"a caption")]
        _tar(shards / f"pool-{s:06d}.tar", members)
    _tar(shards / "pool-000002.tar", [("bad.jpg", b"<html>not an image</html>"), ("nopic.json", b"{}")])
    cfg = _cfg(digits_world, tmp_path, sources=["webdataset"],
               webdataset=[f"file://{shards}/pool-{{000000..000002}}.tar"])
    crawl(cfg)
    rows = _records(tmp_path)
    assert sum(r["status"] == "ok" for r in rows) == 40
    bad = {r["url"].rsplit("#", 1)[1]: r for r in rows if r["status"] == "error"}
    assert {k: (r["error"], r["class"]) for k, r in bad.items()} == {"bad": ("not_image", ""), "nopic": ("no_image", "")}
    assert all(r["url"].startswith((shards / "pool-000000.tar").resolve().as_uri() + "#")
               for r in rows if r["url"].endswith("#000003"))
    pool = [json.loads(ln) for f in (tmp_path / "runs" / "pool" / "crawl" / "pools").glob("*.jsonl")
            for ln in f.read_text().splitlines()]
    origin = {p["id"].rsplit("#", 1)[1]: p["origin"] for p in pool}
    assert origin["000007"] == "http://x/7.jpg"  # the sample's own url kept as provenance
    crawl(cfg)  # a rerun records the bad samples no second time
    assert len(_records(tmp_path)) == len(rows)


def _one_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("kd3: error: "), err
    return err[0]


def test_bad_pool_files_are_one_line_errors_before_any_work(digits_world, tmp_path, capsys):
    base = ["crawl", "--set", "name=x", "--set", f"runs_root={tmp_path / 'runs'}", "--teacher",
            str(digits_world["teacher"])]
    not_tar = tmp_path / "pool-0.tar"
    not_tar.write_bytes(b"this is no tar file at all" * 40)
    line = _one_line(capsys, [*base, "--crawl.sources", "webdataset", "--crawl.webdataset", str(not_tar)])
    assert str(not_tar) in line and "is not a tar file" in line
    for name, arr, what in (("gray.npy", np.zeros((4, 16, 16), np.uint8), "shape (4, 16, 16)"),
                            ("float.npy", np.zeros((4, 16, 16, 3), np.float32), "dtype float32"),
                            ("rgba.npz", np.zeros((4, 16, 16, 4), np.uint8), "shape (4, 16, 16, 4)")):
        if name.endswith(".npz"):
            np.savez(tmp_path / name, images=arr)
        else:
            np.save(tmp_path / name, arr)
        line = _one_line(capsys, [*base, "--crawl.sources", "arrays", "--crawl.arrays", str(tmp_path / name)])
        assert str(tmp_path / name) in line and what in line and "N x H x W x 3 uint8" in line
    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((2, 16, 16, 3), np.uint8))
    line = _one_line(capsys, [*base, "--crawl.sources", "arrays", "--crawl.arrays", str(ok), "--crawl.assign", "clip",
                              "--set", "curate.clip_model=kd3-tiny-clip", "--set", "curate.clip_pretrained=null"])
    assert "crawl.assign clip" in line and "random" in line
    line = _one_line(capsys, [*base, "--crawl.sources", "arrays"])
    assert "crawl.arrays" in line
    cut = tmp_path / "cut.npy"  # a copy that stopped short
    cut.write_bytes(ok.read_bytes()[:-100])
    line = _one_line(capsys, [*base, "--crawl.sources", "arrays", "--crawl.arrays", str(cut)])
    assert str(cut) in line and "unreadable" in line
    assert not (tmp_path / "runs").exists()


def test_npy_pools_are_read_in_blocks_of_rows_in_either_memory_order(tmp_path):
    """A .npy pool is read a block of rows at a time (a memory map would keep every page read resident: the
    whole pool by the end); the rows are the array's, C or Fortran order; a file cut inside its rows is one
    line naming it."""
    from crawlers.pools import npy_rows
    from pipeline.core.errors import DataError

    a = np.random.default_rng(0).integers(0, 256, (2500, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "c.npy", a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    for name in ("c.npy", "f.npy"):
        rows = list(npy_rows(tmp_path / name, block=1000))
        assert len(rows) == len(a) and all(np.array_equal(r, x) for r, x in zip(rows, a)), name
    (tmp_path / "t.npy").write_bytes((tmp_path / "c.npy").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t\.npy: unreadable \(the file is shorter than its 2500 rows\)"):
        list(npy_rows(tmp_path / "t.npy"))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused(digits_world, tmp_path):
    from crawlers.stage import crawl

    target = tmp_path / "written-by-the-pickle.txt"
    evil = tmp_path / "train_data_batch_1"
    evil.write_bytes(pickle.dumps({"data": _Payload(str(target))}))
    cfg = _cfg(digits_world, tmp_path, sources=["arrays"], arrays=[str(evil)])
    with pytest.raises(DataError) as ei:
        crawl(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and str(evil) in msg and "refused" in msg and "io.open" in msg
    assert not target.exists()


def test_downsampled_imagenet_batches_several_files(digits_world, digit_pixels, tmp_path):
    """The downsampled-ImageNet layout: a pickled dict whose data is N x 3072 uint8, channel-major."""
    from crawlers.stage import crawl

    imgs, labels = digit_pixels
    files = []
    for k in range(2):
        part = imgs[40 * k:40 * k + 40]
        data = part.transpose(0, 3, 1, 2).reshape(len(part), -1)  # N x 3*16*16, channel-major
        p = tmp_path / f"train_data_batch_{k + 1}"
        p.write_bytes(pickle.dumps({"data": data, "labels": list(map(int, labels[40 * k:40 * k + 40]))}))
        files.append(str(p))
    cfg = _cfg(digits_world, tmp_path, sources=["arrays"], arrays=files)
    crawl(cfg)
    rows = [r for r in _records(tmp_path) if r["status"] == "ok"]
    assert len(rows) == 80
    from PIL import Image

    r = next(r for r in rows if r["url"].endswith("train_data_batch_2#3"))
    with Image.open(tmp_path / "runs" / "pool" / r["path"]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), imgs[43])  # the row, unchanged, as a PNG


def test_pool_files_become_absolute_for_a_served_flow(tmp_path, monkeypatch):
    """absolute_config (a served flow or a torchrun rank may run elsewhere) resolves the pool sources' paths,
    brace patterns included, and leaves file:// URLs alone."""
    from pipeline.core.config import absolute_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"crawl.sources": ["webdataset", "arrays"],
                             "crawl.webdataset": ["shards/pool-{000..002}.tar", "file:///data/x.tar"],
                             "crawl.arrays": ["in32/train_data_batch_{1..2}"]})
    ab = absolute_config(cfg)
    assert ab.crawl.webdataset == [f"{tmp_path}/shards/pool-{{000..002}}.tar", "file:///data/x.tar"]
    assert ab.crawl.arrays == [tmp_path / "in32" / "train_data_batch_{1..2}"]


def test_clip_assignment_with_trained_weights_is_the_zero_shot_argmax(digit_pixels, tmp_path):
    """crawl.assign clip: each image goes to the class whose prompt its CLIP embedding is closest to (a tiny
    open_clip with a weights file whose logit scale is a trained one's; no teacher needed)."""
    import open_clip
    from PIL import Image

    from crawlers.stage import crawl
    from pipeline.curate.embed import ClipEmbedder, register_model_configs

    register_model_configs()
    torch.manual_seed(1)
    model = open_clip.create_model("kd3-tiny-clip", pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    imgs, _ = digit_pixels
    np.save(tmp_path / "pool.npy", imgs[:24])
    cfg = load_config(None, {"name": "pool", "runs_root": str(tmp_path / "runs"), "classes": CLASSES,
                             "crawl.sources": ["arrays"], "crawl.arrays": [str(tmp_path / "pool.npy")],
                             "crawl.assign": "clip", "curate.clip_model": "kd3-tiny-clip",
                             "curate.clip_weights": str(weights), "curate.device": "cpu"})
    crawl(cfg)
    rows = [r for r in _records(tmp_path) if r["status"] == "ok"]
    assert len(rows) == 24 and {r["query"] for r in rows} == {"assign:clip"}
    emb = ClipEmbedder("kd3-tiny-clip", None, weights, "cpu")
    text = emb.text_embeddings([f"a photo of a {c}." for c in CLASSES])
    for r in rows:
        with Image.open(tmp_path / "runs" / "pool" / r["path"]) as im:
            feat, _ = emb.embed(torch.stack([emb.preprocess(im.convert("RGB"))]))
        assert r["class"] == CLASSES[int((feat @ text.T).argmax())]
