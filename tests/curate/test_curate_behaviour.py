"""Resume after a crash, re-deciding without re-embedding, decontamination, relevance refusal,
the teacher backend, folder sources and bad input."""
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from curate_fixtures import CrawlWriter, jpeg, make_cfg, png, stand_in_teacher
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import read_jsonl


def test_crash_in_shard_writing_then_resume(world, monkeypatch):
    import pipeline.curate.shards as shards
    from pipeline.curate import curate

    run = world["run"]
    cfg = make_cfg(run, shard_max_samples=3)
    real = shards.encode_sample
    calls = {"n": 0}

    def boom(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second shard
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(shards, "encode_sample", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        curate(cfg)
    assert not (run / "manifest.json").exists()
    tars = sorted(p.name for p in (run / "shards").iterdir())
    assert tars == ["w-000000.tar"]  # the finished shard only; no temp file of the torn one
    first_mtime = (run / "shards" / "w-000000.tar").stat().st_mtime_ns

    monkeypatch.setattr(shards, "encode_sample", real)
    m = curate(cfg)
    assert m["stats"]["embed"]["computed"] == 0  # nothing re-decoded or re-embedded
    assert m["stats"]["shards"]["reused"] == 1
    assert (run / "shards" / "w-000000.tar").stat().st_mtime_ns == first_mtime
    assert [s["url"] for s in m["shardlist"]] == [f"shards/w-{i:06d}.tar" for i in range(len(m["shardlist"]))]
    assert sum(s["nsamples"] for s in m["shardlist"]) == m["nsamples"]


def test_killed_subprocess_then_rerun(world, tmp_path):
    """SIGKILL a `kd3 curate` mid-embedding; the rerun completes from the cache."""
    run = world["run"]
    code = f"""
import sys, os
sys.argv = ['kd3', 'curate', '--run', {str(run)!r}, '--classes', 'cat,coffee,space',
            '--curate.clip_model', 'kd3-tiny-clip', '--set', 'curate.clip_pretrained=null',
            '--curate.batch_size', '4', '--curate.workers', '1', '--curate.device', 'cpu', '--no-curate.near_dup']
import pipeline.curate.embed as e
real = e.EmbeddingCache.add_part
n = [0]
def add_part(self, *a, **k):
    real(self, *a, **k)
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), 9)
e.EmbeddingCache.add_part = add_part
from pipeline.app.cli import main
sys.exit(main())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (run / "manifest.json").exists()
    from pipeline.curate import curate

    m = curate(make_cfg(run, batch_size=4))
    emb = m["stats"]["embed"]
    assert emb["cached"] >= 8 and emb["computed"] < emb["cached"] + emb["computed"]
    assert m["nsamples"] > 0


def test_rethreshold_redecides_without_reembedding(world, monkeypatch):
    from pipeline.curate import curate
    from pipeline.curate.embed import ClipEmbedder

    run = world["run"]
    m1 = curate(make_cfg(run))
    calls = {"n": 0}
    real = ClipEmbedder.embed

    def counting(self, batch):
        calls["n"] += 1
        return real(self, batch)

    monkeypatch.setattr(ClipEmbedder, "embed", counting)
    m2 = curate(make_cfg(run, phash_threshold=0, min_side=200))
    assert calls["n"] == 0 and m2["stats"]["embed"]["computed"] == 0
    rows = {(r["id"], r["class"]): r for r in read_jsonl(run / "curate" / "decisions.jsonl")}
    s = world["sha"]
    assert rows[(s["chelsea_small"], "cat")]["reason"] == "too_small"  # 225x150 < 200 now
    assert rows[(s["digit"], "space")]["reason"] == "too_small"
    assert m2["thresholds"]["min_side"] == 200 and m1["nsamples"] != m2["nsamples"]
    assert m2["stats"]["validate"]["dropped"]["too_small"] > m1["stats"]["validate"]["dropped"]["too_small"]


def test_decontamination_drops_copies_of_eval_images(world, tmp_path):
    from pipeline.curate import curate

    ims = world["images"]
    ev = tmp_path / "eval" / "space"
    ev.mkdir(parents=True)
    sa = world["sha"]["astronaut"]
    (ev / "a.jpg").write_bytes((world["run"] / "crawl" / "images" / sa[:2] / f"{sa}.jpg").read_bytes())  # exact copy
    (ev / "r.png").write_bytes(png(ims["rocket"].resize((320, 214))))  # resized + re-encoded rocket
    (ev / "broken.jpg").write_bytes(b"garbage")
    m = curate(make_cfg(world["run"], decontaminate=str(tmp_path / "eval"),
                        decontam_threshold=0.9995))  # random tiny CLIP: everything is ~0.9 similar
    rows = {(r["id"], r["class"]): r for r in read_jsonl(world["run"] / "curate" / "decisions.jsonl")}
    s = world["sha"]
    a, r = rows[(s["astronaut"], "space")], rows[(s["rocket"], "space")]
    assert a["reason"] == "contaminated" and a["detail"].startswith("exact")
    assert r["reason"] == "contaminated"
    assert m["stats"]["decontaminate"]["dropped"]["contaminated"] >= 2
    assert m["stats"]["decontaminate"]["eval_images"] == 2
    assert rows[(s["coffee"], "coffee")]["kept"]


def test_relevance_filter_refused_with_random_weights(world):
    from pipeline.curate import curate

    with pytest.raises(ConfigError, match="random/untrained"):
        curate(make_cfg(world["run"], relevance_filter=True))
    assert not (world["run"] / "curate" / "decisions.jsonl").exists()


def test_relevance_filter_with_weights_file_applies_the_rule(world, tmp_path):
    import open_clip

    from pipeline.curate import curate
    from pipeline.curate.embed import register_model_configs

    register_model_configs()
    torch.manual_seed(1)
    model = open_clip.create_model("kd3-tiny-clip", pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))  # as a trained CLIP has
    wpath = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), wpath)
    m = curate(make_cfg(world["run"], clip_weights=str(wpath), relevance_filter=True, relevance_margin=0.0,
                        negative_prompts=["text", "a logo"]))
    assert m["embedding"]["trained"] is True
    rows = read_jsonl(world["run"] / "curate" / "decisions.jsonl")
    checked = 0
    for r in rows:
        if r["clip_scores"] is None or r["reason"] in ("invalid", "bomb", "too_small", "bad_aspect"):
            continue
        if r["reason"] == "off_class":
            assert r["clip_top"] != r["class"]
            checked += 1
        elif r["kept"]:
            assert r["clip_top"] == r["class"]  # margin 0: any other top label would have dropped it
    assert m["stats"]["relevance"]["dropped"].get("off_class", 0) == checked


def test_teacher_backend_and_embedding_near_duplicates(tmp_path, images, monkeypatch):
    from pipeline.curate import curate

    classes = ["cat", "coffee"]
    stand_in_teacher(monkeypatch, classes)
    run = tmp_path / "runs" / "t"
    cw = CrawlWriter(run)
    base = images["chelsea"]
    s_orig = cw.add("cat", jpeg(base, 95), "jpg")
    # near-duplicate in embedding space but not by pHash: a 12% crop, brightened
    crop = base.crop((30, 20, 420, 285)).point(lambda v: min(255, int(v * 1.08)))
    s_crop = cw.add("cat", jpeg(crop, 90), "jpg")
    s_china = cw.add("cat", jpeg(images["china"]), "jpg")
    s_coffee = cw.add("coffee", jpeg(images["coffee"]), "jpg")
    s_ihc = cw.add("coffee", jpeg(images["ihc"]), "jpg")
    cw.write()
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in")
    cfg = make_cfg(run, classes=classes, embed_backend="teacher", near_dup_threshold=0.97)
    cfg.teacher = teacher
    m = curate(cfg)
    rows = {r["id"]: r for r in read_jsonl(run / "curate" / "decisions.jsonl")}
    assert rows[s_crop]["reason"] == "near_dup" and rows[s_crop]["dup_of"] == s_orig
    assert all(rows[s]["kept"] for s in (s_orig, s_china, s_coffee, s_ihc))
    assert m["embedding"]["backend"] == "teacher" and m["embedding"]["dim"] == 48
    assert all(rows[s]["clip_scores"] is None and 0 <= rows[s]["teacher_conf"] <= 1 for s in rows)


def test_folder_source(tmp_path, images):
    from pipeline.curate import curate

    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "coffee").mkdir()
    (root / "cat" / "a.jpg").write_bytes(jpeg(images["chelsea"]))
    (root / "cat" / "b.png").write_bytes(png(images["china"]))
    (root / "coffee" / "c.jpg").write_bytes(jpeg(images["coffee"]))
    (root / "coffee" / "notes.txt").write_text("ignored")
    run = tmp_path / "runs" / "f"
    run.mkdir(parents=True)
    cfg = make_cfg(run, classes=["cat", "coffee", "space"])
    cfg.crawl.folder = root
    m = curate(cfg)
    assert m["class_counts"] == {"cat": 2, "coffee": 1, "space": 0}  # empty class: warning, run goes on
    rows = read_jsonl(run / "curate" / "decisions.jsonl")
    assert all(r["url"].startswith("file://") for r in rows)


def test_bad_input(tmp_path):
    from pipeline.curate import curate

    with pytest.raises(DataError, match="does not exist"):
        curate(make_cfg(tmp_path / "runs" / "nope"))
    run = tmp_path / "runs" / "empty"
    (run / "crawl").mkdir(parents=True)
    with pytest.raises(DataError, match="records.jsonl is missing"):
        curate(make_cfg(run))
    cw = CrawlWriter(run)
    cw.error("cat", "http://x.test/1.jpg")
    cw.write()
    with pytest.raises(DataError, match="no usable images"):
        curate(make_cfg(run))
    # through the CLI: one line, exit 2
    p = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "curate", "--run", str(run), "--classes", "cat"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "kd3: error:" in p.stderr and "no usable images" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (run / "manifest.json").exists()


def test_offline_pretrained_tag_gives_one_line_error(tmp_path, world):
    from pipeline.curate import curate

    with pytest.raises(ConfigError) as e:
        curate(make_cfg(world["run"], clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k"))
    msg = str(e.value)
    assert "\n" not in msg and "curate.clip_weights" in msg and "embed_backend: teacher" in msg
