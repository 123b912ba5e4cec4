"""A planted pool for curate's safety checks: distinct low-detail images (handwritten digits, 32 px)
plus exact copies and re-encoded copies whose originals are known, written as crawl output.

Curate must keep every distinct digit and remove the copies; ``truth`` says which is which. The
digits are scikit-learn's 1,797 8×8 scans upsampled to 32×32; beyond 1,797 each scan is used again
through a random affine + elastic deformation (another hand writing the same digit, not a copy).
Re-encoded copies are resized (mostly upscaled, as copies on the web often are) and re-encoded at
another JPEG quality.

    python -m kd3demo.planted --out /tmp/planted --distinct 5000 --exact 100 --reencoded 100
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _jpeg(im, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _deform(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotation/scale/shift + a smooth elastic field on a 32×32 float image."""
    from scipy import ndimage

    n = a.shape[0]
    ang = np.deg2rad(rng.uniform(-15, 15))
    s = rng.uniform(0.8, 1.1)
    c, si = np.cos(ang) / s, np.sin(ang) / s
    mat = np.array([[c, -si], [si, c]])
    centre = np.array([n / 2 - 0.5, n / 2 - 0.5])
    offset = centre - mat @ centre + rng.uniform(-3, 3, size=2)
    out = ndimage.affine_transform(a, mat, offset=offset, order=1, mode="constant")
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (n, n)), 4) * 60
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (n, n)), 4) * 60
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return ndimage.map_coordinates(out, [yy + dy, xx + dx], order=1, mode="constant")


def distinct_digit(k: int, seed: int = 0):
    """The k-th distinct digit: (PIL RGB 32×32, class index)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = _digits_cache.get("d")
    if d is None:
        d = _digits_cache["d"] = load_digits()
    src, variant = k % len(d.images), k // len(d.images)
    im = Image.fromarray(np.clip(d.images[src] / 16 * 255, 0, 255).astype(np.uint8), "L").resize((32, 32),
                                                                                                   Image.BILINEAR)
    if variant:
        a = np.asarray(im, np.float32)
        for attempt in range(20):  # a deformation that pushes the digit out of the frame is no digit
            b = _deform(a, np.random.default_rng([seed, k, attempt]))
            if b.sum() >= 0.7 * a.sum():
                break
        im = Image.fromarray(np.clip(b, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB"), int(d.target[src])


_digits_cache: dict = {}


def reencode(data: bytes, rng: np.random.Generator) -> bytes:
    """Resize (×0.9–1.25, mostly up) and re-encode at another JPEG quality: a perceptual copy."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    scale = float(rng.choice([1.25, 1.25, rng.uniform(0.9, 1.2)]))
    side = max(32, int(round(im.width * scale)))
    return _jpeg(im.resize((side, side), Image.BICUBIC), int(rng.integers(40, 96)))


@dataclass
class Planted:
    run: Path
    truth: dict[str, dict] = field(default_factory=dict)   # sha -> {kind, cls, of}
    exact: list[tuple[str, str]] = field(default_factory=list)  # (sha, class) rows that repeat a file

    def shas(self, kind: str) -> list[str]:
        return [s for s, t in self.truth.items() if t["kind"] == kind]


def _write(run: Path, rows: list[dict], cls: str, data: bytes, name: str) -> str:
    sha = hashlib.sha256(data).hexdigest()
    rel = f"crawl/images/{sha[:2]}/{sha}.jpg"
    p = run / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        p.write_bytes(data)
    rows.append({"class": cls, "query": cls, "engine": "bing", "url": f"http://planted.test/{name}.jpg",
                 "status": "ok", "error": None, "sha256": sha, "bytes": len(data), "w": 0, "h": 0, "path": rel,
                 "time": time.time()})
    return sha


def plant(run: Path, n_distinct: int, n_exact: int, n_reencoded: int, seed: int = 0) -> Planted:
    """Write ``run/crawl/records.jsonl`` + images: distinct digits, then exact and re-encoded copies of
    random originals (in the original's class; every 5th copy filed under another class)."""
    run = Path(run)
    rows: list[dict] = []
    out = Planted(run)
    originals: list[tuple[str, bytes, int]] = []
    rng = np.random.default_rng(seed)
    k = 0
    while len(originals) < n_distinct:
        im, c = distinct_digit(k, seed)
        k += 1
        data = _jpeg(im, int(rng.integers(85, 96)))
        if hashlib.sha256(data).hexdigest() in out.truth:  # e.g. a digit deformed out of the frame: blank
            continue
        sha = _write(run, rows, NAMES[c], data, f"d{k - 1}")
        out.truth[sha] = {"kind": "distinct", "cls": NAMES[c], "of": None}
        originals.append((sha, data, c))
    for j in range(n_exact + n_reencoded):
        osha, data, c = originals[int(rng.integers(len(originals)))]
        cls = NAMES[(c + 1 + int(rng.integers(9))) % 10] if j % 5 == 4 else NAMES[c]
        exact = j < n_exact
        copy = data if exact else reencode(data, rng)
        sha = _write(run, rows, cls, copy, f"c{j}")
        if exact:
            out.exact.append((sha, cls))
        else:
            out.truth.setdefault(sha, {"kind": "reencoded", "cls": cls, "of": osha})
    (run / "crawl").mkdir(parents=True, exist_ok=True)
    (run / "crawl" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--distinct", type=int, default=5000)
    ap.add_argument("--exact", type=int, default=100)
    ap.add_argument("--reencoded", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = plant(a.out, a.distinct, a.exact, a.reencoded, a.seed)
    (a.out / "truth.json").write_text(json.dumps(p.truth))
    print(f"{a.out}: {len(p.shas('distinct'))} distinct, {a.exact} exact, {len(p.shas('reencoded'))} re-encoded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
