"""Shared fixtures: a tiny digits teacher (trained through `kd3 teacher train`) and a tiny web pool
written as webdataset shards + a manifest, the way the curate stage writes them."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.io import atomic_write_json, sha256_file

CLASSES = ["digit0", "digit1", "digit2", "digit3"]
SIZE = 16


def digit_image(arr8: np.ndarray, invert: bool = False, tint=(1.0, 1.0, 1.0)) -> Image.Image:
    a = (arr8 / 16.0 * 255).astype(np.uint8)
    if invert:
        a = 255 - a
    im = Image.fromarray(a, "L").resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
    x = np.asarray(im).astype(np.float32) * np.array(tint, dtype=np.float32)
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def write_folder(root: Path, items) -> Path:
    for i, (im, label) in enumerate(items):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.png")
    return root


def write_shards(root: Path, samples, per_shard: int = 120, name: str = "web") -> Path:
    """samples: list of (PIL image, query label). Returns manifest path."""
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shardlist = []
    for s0 in range(0, len(samples), per_shard):
        path = shard_dir / f"{name}-{s0 // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for j, (im, label) in enumerate(samples[s0:s0 + per_shard]):
                data = png_bytes(im)
                import hashlib

                sha = hashlib.sha256(data + str(s0 + j).encode()).hexdigest()
                key = sha[:16]
                meta = json.dumps({"class": CLASSES[label], "label": label, "url": f"http://x/{key}",
                                   "sha256": sha, "w": SIZE, "h": SIZE, "scores": {}}).encode()
                for ext, payload in (("png", data), ("json", meta), ("cls", str(label).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
        shardlist.append({"url": f"shards/{path.name}", "nsamples": len(samples[s0:s0 + per_shard]),
                          "filesize": path.stat().st_size, "sha256": sha256_file(path)})
    man = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": root.name, "shardlist": shardlist,
           "classes": CLASSES, "class_counts": {}, "nsamples": len(samples)}
    atomic_write_json(root / "manifest.json", man)
    return root / "manifest.json"


@pytest.fixture(scope="session")
def digits_world(tmp_path_factory):
    """teacher.pt (cnn_small, 16 px, 4 digit classes), an eval ImageFolder and a 240-image web run dir."""
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = d.images, d.target
    keep = np.nonzero(y < 4)[0]
    rng = np.random.default_rng(0)
    rng.shuffle(keep)
    train_idx, eval_idx, web_idx = keep[:300], keep[300:380], keep[380:580]
    base = tmp_path_factory.mktemp("digits")
    train_dir = write_folder(base / "train", [(digit_image(X[i]), int(y[i])) for i in train_idx])
    eval_dir = write_folder(base / "eval", [(digit_image(X[i]), int(y[i])) for i in eval_idx])
    from pipeline.app.cli import main

    teacher = base / "teacher.pt"
    rc = main(["teacher", "train", "--data", str(train_dir), "--arch", "cnn_small", "--out", str(teacher),
               "--epochs", "6", "--img-size", str(SIZE), "--batch-size", "32", "--lr", "0.05",
               "--device", "cpu", "--val-dir", str(eval_dir)])
    assert rc == 0
    # web pool: in-class digits (some tinted), inverted "cartoons", and off-class digits under a query label
    web = []
    for n, i in enumerate(web_idx):
        tint = (1.0, 0.7, 0.7) if n % 3 == 0 else (1.0, 1.0, 1.0)
        web.append((digit_image(X[i], tint=tint), int(y[i])))
    off = np.nonzero(y >= 4)[0][:40]
    web += [(digit_image(X[i], invert=(k % 2 == 0)), k % 4) for k, i in enumerate(off)]
    run = base / "runs" / "web"
    manifest = write_shards(run, web)
    return {"teacher": teacher, "eval_dir": eval_dir, "run": run, "manifest": manifest, "n_web": len(web),
            "base": base}
