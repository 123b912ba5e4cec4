"""Helpers for the curate tests: a crawl-output run directory built from REAL images that ship
in scikit-image / scikit-learn, with every awkward case the curate stage must handle."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = {"clip_model": "kd3-tiny-clip", "clip_pretrained": None, "batch_size": 8, "workers": 2,
        "device": "cpu", "max_side": 128, "near_dup_threshold": 0.9995}


def jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(w: int = 50_000, h: int = 50_000) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb by its header)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_images() -> dict[str, Image.Image]:
    import skimage.data as d
    from sklearn.datasets import load_digits, load_sample_images

    sk = load_sample_images()
    digits = load_digits()
    digit = Image.fromarray((digits.images[0] * 16).astype(np.uint8), "L").resize((96, 96), Image.NEAREST)
    return {
        "astronaut": Image.fromarray(d.astronaut()),
        "coffee": Image.fromarray(d.coffee()),
        "chelsea": Image.fromarray(d.chelsea()),
        "rocket": Image.fromarray(d.rocket()),
        "camera": Image.fromarray(d.camera()).convert("RGB"),
        "coins": Image.fromarray(d.coins()).convert("RGB"),
        "china": Image.fromarray(sk.images[0]),
        "flower": Image.fromarray(sk.images[1]),
        "hubble": Image.fromarray(d.hubble_deep_field()),
        "ihc": Image.fromarray(d.immunohistochemistry()),
        "brick": Image.fromarray(d.brick()).convert("RGB"),
        "colorwheel": Image.fromarray(d.colorwheel()),
        "digit": digit.convert("RGB"),
        "logo": Image.fromarray(d.logo()),  # RGBA
    }


class CrawlWriter:
    """Writes crawl output exactly as docs/INTERFACES.md says (records.jsonl + content-addressed files)."""

    def __init__(self, run: Path):
        self.run = run
        self.rows: list[dict] = []
        (run / "crawl" / "images").mkdir(parents=True, exist_ok=True)

    def add(self, cls: str, data: bytes, ext: str, name: str = "", status: str = "ok") -> str:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"crawl/images/{sha[:2]}/{sha}.{ext}"
        p = self.run / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_bytes(data)
        try:
            w, h = Image.open(io.BytesIO(data)).size
        except Exception:
            w = h = 0
        self.rows.append({"class": cls, "query": cls, "engine": "bing", "url": f"http://img.test/{name or sha[:8]}.{ext}",
                          "status": status, "error": None, "sha256": sha, "bytes": len(data), "w": w, "h": h,
                          "path": rel, "time": time.time()})
        return sha

    def error(self, cls: str, url: str, err: str = "http_404") -> None:
        self.rows.append({"class": cls, "query": cls, "engine": "bing", "url": url, "status": "error", "error": err,
                          "sha256": None, "bytes": 0, "w": 0, "h": 0, "path": None, "time": time.time()})

    def write(self) -> Path:
        p = self.run / "crawl" / "records.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        return p


def build_world(root: Path) -> dict:
    """Run dir runs/w with 3 classes and every special case; returns {name: sha} of what went in."""
    ims = real_images()
    run = root / "runs" / "w"
    cw = CrawlWriter(run)
    s = {}
    # class "cat"
    s["chelsea"] = cw.add("cat", jpeg(ims["chelsea"], 95), "jpg", "chelsea")
    s["chelsea_q60"] = cw.add("cat", jpeg(ims["chelsea"], 60), "jpg", "chelsea_q60")              # re-encoded
    s["chelsea_small"] = cw.add("cat", jpeg(ims["chelsea"].resize((225, 150)), 90), "jpg", "small")  # resized
    s["china"] = cw.add("cat", jpeg(ims["china"]), "jpg", "china")
    s["cmyk"] = cw.add("cat", jpeg(ims["flower"].convert("CMYK")), "jpg", "cmyk")                   # CMYK JPEG
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 CW on display
    s["exif"] = cw.add("cat", jpeg(ims["hubble"].resize((200, 120)), exif=ex.tobytes()), "jpg", "exif")
    s["truncated"] = cw.add("cat", jpeg(ims["coins"])[:3000], "jpg", "truncated")                   # truncated
    s["bomb"] = cw.add("cat", bomb_png(), "png", "bomb")                                           # bomb
    cw.add("cat", jpeg(ims["chelsea"], 95), "jpg", "chelsea-again")                                # same file, same class
    cw.error("cat", "http://img.test/404.jpg")
    # class "coffee"
    s["coffee"] = cw.add("coffee", jpeg(ims["coffee"]), "jpg", "coffee")
    s["chelsea_in_coffee"] = cw.add("coffee", jpeg(ims["chelsea"], 95), "jpg", "chelsea-x")      # cross-class exact
    s["alpha"] = cw.add("coffee", png(ims["logo"]), "png", "alpha")                               # RGBA PNG
    s["palette"] = cw.add("coffee", png(ims["colorwheel"].convert("P", palette=Image.ADAPTIVE)), "png", "palette")
    a16 = (np.asarray(ims["camera"].convert("L"), dtype=np.uint16) * 257)
    s["16bit"] = cw.add("coffee", png(Image.fromarray(a16)), "png", "16bit")               # 16-bit
    s["tiny"] = cw.add("coffee", png(ims["digit"].resize((16, 16))), "png", "tiny")                # too small
    s["pano"] = cw.add("coffee", jpeg(ims["brick"].resize((500, 50))), "jpg", "pano")              # bad aspect
    s["notimage"] = cw.add("coffee", b"<html>not an image</html>", "jpg", "html")                   # corrupt
    # class "space"
    s["astronaut"] = cw.add("space", jpeg(ims["astronaut"]), "jpg", "astronaut")
    s["rocket"] = cw.add("space", jpeg(ims["rocket"]), "jpg", "rocket")
    s["ihc"] = cw.add("space", jpeg(ims["ihc"]), "jpg", "ihc")
    s["digit"] = cw.add("space", png(ims["digit"]), "png", "digit")
    s["coffee_in_space_small"] = cw.add("space", jpeg(ims["coffee"].resize((300, 200)), 80), "jpg", "cx")  # cross pHash
    cw.write()
    return {"run": run, "sha": s, "images": ims}


def make_cfg(run: Path, classes=("cat", "coffee", "space"), **curate):
    from pipeline.core.config import load_config

    ov = {"name": run.name, "runs_root": str(run.parent), "classes": list(classes)}
    for k, v in {**TINY, **curate}.items():
        ov[f"curate.{k}"] = v
    return load_config(None, ov)


def stand_in_teacher(monkeypatch, classes):
    """distill.teacher.load_teacher stand-in: a fixed colour-layout feature extractor."""
    import torch

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(48, len(classes))
            torch.manual_seed(0)

        def forward_features(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4)  # B,3,4,4

        def pool(self, f):
            f = f.flatten(1)
            return f - f.mean(1, keepdim=True)

        def forward(self, x):
            return self.classifier(self.pool(self.forward_features(x)))

    def load_teacher(path, device):
        return T().to(device), {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": list(classes)}

    monkeypatch.setattr("distill.embedder.load_teacher", load_teacher)
