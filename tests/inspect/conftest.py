"""A realistic small run directory in the formats of docs/INTERFACES.md, built from real images.

Classes ``cat``, ``coffee`` and ``flower`` are random crops of skimage's ``chelsea``/``cat``,
``coffee`` and sklearn's ``flower.jpg``; upsampled sklearn digits play the off-class junk a search
engine returns. Every drop reason of ``runs.DROP_REASONS`` occurs at least once, near-duplicates
point at their original with ``dup_of``, shards are real webdataset tars, the manifest is wids-shaped,
embeddings are 8x8x3 pixel vectors (so a near-duplicate is a nearest neighbour) in a real FAISS index,
and two distill runs (kd3 with a selection log, kd without) have metrics.json.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipeline.core.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file, write_jsonl_atomic
from pipeline.core.records import DROP_REASONS
from pipeline.core.runs import RunDir

CLASSES = ["cat", "coffee", "flower"]
KEPT_PER_CLASS = 8


def _sources() -> dict[str, list[np.ndarray]]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    flower = [im for name, im in zip(load_sample_images().filenames, load_sample_images().images)
              if name.endswith("flower.jpg")][0]
    return {"cat": [sd.chelsea(), sd.cat()], "coffee": [sd.coffee()], "flower": [flower]}


def _digits() -> list[Image.Image]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(6):
        a = (d.images[i] / 16.0 * 255).astype(np.uint8)
        im = Image.fromarray(255 - a).resize((96, 96), Image.Resampling.NEAREST).convert("RGB")
        out.append(im)
    return out


def _jpeg(im: Image.Image, q: int = 90) -> bytes:
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=q)
    return b.getvalue()


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def _embed(im: Image.Image) -> np.ndarray:
    v = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-8)


def make_run(root: Path, name: str = "fixture", *, stages=("crawl", "curate", "distill")) -> RunDir:
    """Write ``root/name`` with the given stages done; returns its RunDir."""
    rng = np.random.default_rng(0)
    rd = RunDir(Path(root) / name)
    rd.root.mkdir(parents=True, exist_ok=True)
    (rd.root / "config.yaml").write_text(
        f"name: {name}\nruns_root: {root}\nclasses: [{', '.join(CLASSES)}]\n", encoding="utf-8")
    srcs = _sources()
    digits = _digits()
    records: list[dict] = []
    decisions: list[dict] = []
    images: dict[str, Image.Image | None] = {}  # id -> decoded image (None when not decodable)
    t0 = 1_700_000_000.0

    def store(cls: str, data: bytes, ext: str, im: Image.Image | None, url: str) -> str:
        sha = sha256_bytes(data)
        path = rd.image_path(sha, ext)
        atomic_write_bytes(path, data, overwrite=False)
        images[sha] = im
        w, h = im.size if im is not None else (0, 0)
        records.append({"class": cls, "query": f"a photo of a {cls}", "engine": "bing", "url": url,
                        "status": "ok", "error": "", "sha256": sha, "bytes": len(data), "w": w, "h": h,
                        "path": str(path.relative_to(rd.root)), "time": t0 + len(records)})
        return sha

    def decide(cls: str, sha: str, *, reason=None, detail="", dup_of=None, top=None, url="") -> dict:
        im = images[sha]
        label = CLASSES.index(cls)
        scores = None
        if im is not None and reason not in ("invalid", "too_small", "bad_aspect", "bomb"):
            s = rng.uniform(0.02, 0.2, len(CLASSES))
            s[CLASSES.index(top or cls)] = rng.uniform(0.55, 0.95)
            scores = [round(float(x), 4) for x in s / s.sum()]
        row = {"id": sha, "class": cls, "label": label,
               "path": next(r["path"] for r in records if r["sha256"] == sha), "url": url,
               "kept": reason is None, "reason": reason, "detail": detail, "dup_of": dup_of,
               "w": im.size[0] if im is not None else 0, "h": im.size[1] if im is not None else 0,
               "phash": f"{int(rng.integers(0, 2**63)):016x}" if im is not None else None,
               "clip_scores": scores,
               "clip_top": CLASSES[int(np.argmax(scores))] if scores else None,
               "teacher_conf": round(float(rng.uniform(0.3, 0.99)), 3) if scores else None,
               "shard": None, "key": None}
        decisions.append(row)
        return row

    kept_ids: dict[str, list[str]] = {c: [] for c in CLASSES}
    n_url = 0

    def url() -> str:
        nonlocal n_url
        n_url += 1
        return f"http://images.example.test/{n_url:04d}.jpg"

    for cls in CLASSES:
        arrs = srcs[cls]
        for i in range(KEPT_PER_CLASS):
            a = arrs[i % len(arrs)]
            H, W = a.shape[:2]
            ch = int(H * rng.uniform(0.45, 0.8))
            cw = int(min(W, ch * rng.uniform(0.8, 1.4)))
            y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
            im = Image.fromarray(a[y:y + ch, x:x + cw]).resize((int(cw * 160 / ch), 160))
            u = url()
            sha = store(cls, _jpeg(im), "jpg", im, u)
            decide(cls, sha, url=u)
            kept_ids[cls].append(sha)
        # a URL that failed and one that returned known content again
        records.append({"class": cls, "query": cls, "engine": "baidu", "url": url(), "status": "error",
                        "error": "http_404", "sha256": "", "bytes": 0, "w": 0, "h": 0, "path": "",
                        "time": t0 + len(records)})
        dup_rec = dict(next(r for r in records if r["sha256"] == kept_ids[cls][0]))
        dup_rec.update(status="duplicate", url=url(), time=t0 + len(records))
        records.append(dup_rec)

    def img(i):
        return images[kept_ids[i[0]][i[1]]]

    # --- every drop reason, spread over the classes ---
    u = url()
    sha = store("cat", b"<html><body>not an image</body></html>", "jpg", None, u)
    decide("cat", sha, reason="invalid", detail="cannot identify image file", url=u)
    small = img(("cat", 1)).resize((20, 20))
    u = url()
    decide("cat", store("cat", _jpeg(small), "jpg", small, u), reason="too_small", detail="20x20 < 32", url=u)
    src = img(("cat", 0))
    u = url()
    decide("cat", store("cat", _png(src), "png", src, u), reason="exact_dup", detail="same pixels",
           dup_of=kept_ids["cat"][0], url=u)
    bright = ImageEnhance.Brightness(img(("cat", 2))).enhance(1.08)
    u = url()
    decide("cat", store("cat", _jpeg(bright, 80), "jpg", bright, u), reason="phash_dup", detail="hamming 2",
           dup_of=kept_ids["cat"][2], url=u)
    u = url()
    decide("cat", store("cat", _jpeg(digits[0]), "jpg", digits[0], u), reason="off_class",
           detail="clip top: coffee (+0.41)", top="coffee", url=u)

    strip = img(("coffee", 0)).resize((320, 40))
    u = url()
    decide("coffee", store("coffee", _jpeg(strip), "jpg", strip, u), reason="bad_aspect",
           detail="aspect 8.0 > 4.0", url=u)
    base = img(("coffee", 3))
    shifted = base.crop((4, 4, base.size[0] - 2, base.size[1] - 3)).resize(base.size)
    u = url()
    decide("coffee", store("coffee", _jpeg(shifted), "jpg", shifted, u), reason="near_dup",
           detail="cosine 0.981", dup_of=kept_ids["coffee"][3], url=u)
    # the very same file found for 'coffee' and for 'cat': one content-addressed file, two decisions
    cat4 = kept_ids["cat"][4]
    records.append(dict(next(r for r in records if r["sha256"] == cat4), **{"class": "coffee", "url": url()}))
    decide("coffee", cat4, reason="cross_class_dup", detail="also found for cat", dup_of=cat4)
    u = url()
    decide("coffee", store("coffee", _jpeg(digits[1]), "jpg", digits[1], u), reason="off_class",
           detail="clip top: flower (+0.33)", top="flower", url=u)
    u = url()
    decide("coffee", store("coffee", _jpeg(digits[2]), "jpg", digits[2], u), reason="contaminated",
           detail="cosine 0.97 to eval/3/img_0007.png", url=u)

    big = img(("flower", 5))
    u = url()
    decide("flower", store("flower", _jpeg(big, 70), "jpg", big, u), reason="bomb",
           detail="40000x40000 > max_pixels", url=u)
    base = img(("flower", 1))
    near = base.crop((3, 0, base.size[0], base.size[1] - 5)).resize(base.size)
    u = url()
    decide("flower", store("flower", _jpeg(near), "jpg", near, u), reason="near_dup", detail="cosine 0.975",
           dup_of=kept_ids["flower"][1], url=u)
    bright = ImageEnhance.Contrast(img(("flower", 6))).enhance(1.1)
    u = url()
    decide("flower", store("flower", _jpeg(bright), "jpg", bright, u), reason="phash_dup", detail="hamming 3",
           dup_of=kept_ids["flower"][6], url=u)
    u = url()
    decide("flower", store("flower", _jpeg(digits[3]), "jpg", digits[3], u), reason="contaminated",
           detail="cosine 0.99 to eval/5/img_0002.png", url=u)
    assert {d["reason"] for d in decisions if d["reason"]} == set(DROP_REASONS)

    write_jsonl_atomic(rd.records, records)
    summary = {"ok": True, "classes": {c: {"ok": sum(1 for r in records if r["class"] == c and r["status"] == "ok"),
                                           "tried": sum(1 for r in records if r["class"] == c)} for c in CLASSES}}
    atomic_write_json(rd.crawl_summary, summary)
    if "curate" not in stages:
        return rd

    # --- shards: kept images, re-encoded JPEG, split over two shards ---
    kept = [d for d in decisions if d["kept"]]
    shard_names = [f"shards/{name}-{i:06d}.tar" for i in range(2)]
    rd.shards.mkdir(parents=True, exist_ok=True)
    per_shard: list[list[dict]] = [kept[: len(kept) // 2 + 1], kept[len(kept) // 2 + 1:]]
    for sname, rows in zip(shard_names, per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for d in rows:
                key = d["id"][:16]
                d["key"], d["shard"] = key, sname
                meta = {"class": d["class"], "label": d["label"], "url": d["url"], "sha256": d["id"],
                        "w": d["w"], "h": d["h"], "scores": {"clip": d["clip_scores"]}}
                for ext, payload in (("jpg", _jpeg(images[d["id"]], 92)), ("json", json.dumps(meta).encode()),
                                     ("cls", str(d["label"]).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime = len(payload), int(t0)
                    tf.addfile(ti, io.BytesIO(payload))
        atomic_write_bytes(rd.root / sname, buf.getvalue())
    write_jsonl_atomic(rd.decisions, decisions)

    # --- embeddings of every decodable image (one row per distinct id) + index of kept ones ---
    ids = [sha for sha, im in images.items() if im is not None]
    emb = np.stack([_embed(images[s]) for s in ids]).astype(np.float32)
    rd.curate.mkdir(parents=True, exist_ok=True)
    with open(rd.embeddings, "wb") as fh:
        np.save(fh, emb)
    atomic_write_json(rd.embedding_ids, ids)
    import faiss

    kept_unique = list(dict.fromkeys(d["id"] for d in kept))
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.stack([emb[ids.index(s)] for s in kept_unique]))
    faiss.write_index(index, str(rd.index))
    atomic_write_json(rd.index_ids, kept_unique)

    dropped = {r: sum(1 for d in decisions if d["reason"] == r) for r in DROP_REASONS}
    steps = [("validate", ("invalid", "too_small", "bad_aspect", "bomb")),
             ("dedup", ("exact_dup", "phash_dup", "near_dup", "cross_class_dup")),
             ("decontaminate", ("contaminated",)), ("relevance", ("off_class",))]
    stats, n = {}, len(decisions)
    for step, reasons in steps:
        out = n - sum(dropped[r] for r in reasons)
        stats[step] = {"in": n, "out": out, "dropped": {r: dropped[r] for r in reasons if dropped[r]}}
        n = out
    stats["shard"] = {"in": n, "out": len(kept), "dropped": {}}
    manifest = {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
        "shardlist": [{"url": s, "nsamples": len(rows), "filesize": (rd.root / s).stat().st_size,
                       "sha256": sha256_file(rd.root / s)} for s, rows in zip(shard_names, per_shard)],
        "classes": CLASSES, "class_counts": {c: sum(1 for d in kept if d["class"] == c) for c in CLASSES},
        "nsamples": len(kept), "stats": stats,
        "embedding": {"backend": "clip", "model": "fixture-pixels", "pretrained": None, "dim": int(emb.shape[1])},
        "thresholds": {"phash": 4, "near_dup": 0.95, "decontam": 0.95},
        "config_hash": "0123456789abcdef", "versions": {"kd3": "0.1.0"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
    }
    atomic_write_json(rd.manifest, manifest)
    if "distill" not in stages:
        return rd

    # --- distill: a kd3 run with a selection log, a kd run without ---
    keys = {c: [d["key"] for d in kept if d["class"] == c] for c in CLASSES}
    # as kd3 logs it: a selected image counts under the class the teacher/student mix predicts (here the
    # first half of the pool is predicted "cat"), out of the pool images predicted as that class
    pool_all = [d["key"] for d in kept]
    pred = {k: ("cat" if i < len(pool_all) // 2 else d["class"]) for i, (k, d) in enumerate(zip(pool_all, kept))}
    pred_counts = [sum(pred[k] == c for k in pool_all) for c in CLASSES]
    epochs, sel_rows = [], []
    for e in range(4):
        frac = [0.25, 0.5, 0.75, 0.875][e]
        chosen = {c: keys[c][: max(1, int(len(keys[c]) * frac)) - (1 if c == "flower" and e else 0)]
                  for c in CLASSES}
        per_class = {c: sum(pred[k] == c for v in chosen.values() for k in v) for c in CLASSES}
        sel_rows.append({"epoch": e, "alpha": round(e / 3, 3),
                         "thresholds": {c: round(0.95 - 0.1 * e, 3) for c in CLASSES},
                         "selected_per_class": per_class, "pred_counts": pred_counts,
                         "selected_keys": [k for c in CLASSES for k in chosen[c]]})
        epochs.append({"epoch": e, "losses": {"kd": 2.0 / (e + 1), "feat": 0.5 / (e + 1), "con": 0.1},
                       "lr": 0.05, "selected": sum(per_class.values()), "selected_per_class": per_class,
                       "eval_top1": 0.4 + 0.1 * e, "val_agreement": 0.5 + 0.1 * e, "time_s": 1.5})
    kd3 = rd.distill / "kd3-fixture"
    atomic_write_json(kd3 / "metrics.json", {
        "method": "kd3", "student": "cnn_small", "config": {"epochs": 4}, "epochs": epochs,
        "teacher": {"path": "/somewhere/teacher.pt", "format": "kd3-checkpoint-v1", "arch": "cnn_small",
                    "arch_kwargs": {}, "classes": CLASSES, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "final": {"top1": 0.7, "teacher_top1": 0.85, "agreement": 0.8, "params": 12345,
                  "flops_per_image": 2_500_000, "cpu_latency_ms_b1": 0.42, "cpu_latency_ms_b64": 3.5,
                  "throughput_img_s": 900.0, "selected_fraction": epochs[-1]["selected"] / len(kept),
                  "eval": "eval_dir", "confusion": [[7, 2, 1], [1, 6, 3], [0, 1, 9]]}})
    write_jsonl_atomic(kd3 / "selection.jsonl", sel_rows)
    kd = rd.distill / "kd-fixture"
    atomic_write_json(kd / "metrics.json", {
        "method": "kd", "student": "cnn_small", "teacher": "teacher.pt", "config": {"epochs": 2},
        "epochs": [{"epoch": e, "losses": {"kd": 1.0}, "lr": 0.05, "selected": len(kept),
                    "selected_per_class": {c: len(keys[c]) for c in CLASSES}, "eval_top1": 0.5 + 0.05 * e,
                    "val_agreement": 0.6, "time_s": 1.0} for e in range(2)],
        "final": {"top1": 0.55, "teacher_top1": 0.85, "agreement": 0.6, "params": 12345,
                  "throughput_img_s": 950.0, "selected_fraction": 1.0, "eval": "web-holdout"}})
    # as the trainer writes it for methods without selection
    write_jsonl_atomic(kd / "selection.jsonl", [{"epoch": e, "alpha": None, "thresholds": None,
                                                 "selected_per_class": {c: len(keys[c]) for c in CLASSES},
                                                 "selected_keys": "all"} for e in range(2)])
    return rd


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("runs"), "fixture")


@pytest.fixture(scope="session")
def crawl_only_run(tmp_path_factory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("runs_crawl"), "crawlonly", stages=("crawl",))


@pytest.fixture(scope="session")
def curate_only_run(tmp_path_factory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("runs_curate"), "curonly", stages=("crawl", "curate"))


@pytest.fixture(scope="session")
def real_curated_run(tmp_path_factory) -> RunDir:
    """The fixture's crawl output curated by the real curate stage (tiny random-weight CLIP, CPU)."""
    from pipeline.core.config import load_config, save_resolved
    from pipeline.curate import curate

    root = tmp_path_factory.mktemp("runs_real")
    rd = make_run(root, "real", stages=("crawl",))
    ov = {"name": "real", "runs_root": str(root), "classes": CLASSES}
    for k, v in {"clip_model": "kd3-tiny-clip", "clip_pretrained": None, "batch_size": 8, "workers": 1,
                 "device": "cpu", "max_side": 128, "near_dup_threshold": 0.9995}.items():
        ov[f"curate.{k}"] = v
    cfg = load_config(None, ov)
    save_resolved(cfg)
    curate(cfg)
    return rd
