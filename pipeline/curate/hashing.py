"""Perceptual (pHash) duplicate detection, used by the ``phash_dedup`` step and decontamination, and
the pixel-level check that confirms a pHash match before anything is dropped.

Perceptual groups are found with *multi-index hashing*: the 64-bit pHash is split into
``t + 1`` disjoint chunks; by the pigeonhole principle two hashes within Hamming distance ``t``
agree exactly on at least one chunk, so only hashes sharing a chunk value are compared. This is
exact (no missed pairs) and sub-quadratic for spread-out hashes, unlike all-pairs comparison.
"""
from __future__ import annotations

import base64
from collections import defaultdict
from typing import NamedTuple, Optional, Sequence

import imagehash
import numpy as np
from PIL import Image


THUMB_SIDE = 16


def phash_hex(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex chars."""
    return str(imagehash.phash(img, hash_size=8))


def facts_of(img: Image.Image) -> dict[str, str]:
    """The perceptual facts of a decoded image: its pHash and its 16×16 greyscale thumbnail (base64 of
    256 bytes), which confirms a pHash match. One greyscale conversion serves both."""
    grey = img.convert("L")
    thumb = np.asarray(grey.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR), np.uint8)
    return {"phash": phash_hex(grey), "thumb": base64.b64encode(thumb.tobytes()).decode("ascii")}


class Thumbs(NamedTuple):
    """The 16×16 greyscale thumbnails of N images: ``px`` [N, 256] uint8 (256 B per image; as float32 they
    took 1 kB) and ``ok`` [N] bool, False where an image has none."""

    px: np.ndarray
    ok: np.ndarray


def thumbs_array(encoded: Sequence[Optional[str]]) -> Thumbs:
    """The thumbnails of base64 strings; a missing one is ``ok`` False (it never confirms a pair)."""
    px = np.zeros((len(encoded), THUMB_SIDE * THUMB_SIDE), np.uint8)
    ok = np.zeros(len(encoded), bool)
    for i, t in enumerate(encoded):
        if t:
            px[i] = np.frombuffer(base64.b64decode(t), np.uint8)
            ok[i] = True
    return Thumbs(px, ok)


def pixel_diff(thumbs: Thumbs, a: np.ndarray, b: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Mean absolute difference (0-255) of the thumbnails of pairs (a[k], b[k]); NaN when one is missing.

    Re-encoded, resized and recompressed copies differ by < 2 on 16×16 thumbnails (handwritten
    digits at 32 px, the hardest case measured, and photos at JPEG quality 20 or a quarter of
    their size); distinct low-detail images whose pHashes collide differ by > 6.

    ``chunk`` pairs at a time: a pool of flat colours or gradients has pHash candidates that grow with the
    square of their number (700k pairs at 200k generated images), and all pairs at once took ~3 GB.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out = np.full(len(a), np.nan, np.float32)
    n = np.float32(thumbs.px.shape[1])
    for s in range(0, len(a), chunk):
        x, y = a[s:s + chunk], b[s:s + chunk]
        total = np.abs(thumbs.px[x].astype(np.int16) - thumbs.px[y].astype(np.int16)).sum(1, dtype=np.int32)
        out[s:s + chunk] = np.where(thumbs.ok[x] & thumbs.ok[y], total.astype(np.float32) / n, np.nan)
    return out


def _chunks(threshold: int) -> list[tuple[int, int]]:
    m = min(threshold + 1, 64)
    bounds = np.linspace(0, 64, m + 1).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(m)]


def near_pairs(hashes: Sequence[int], threshold: int) -> np.ndarray:
    """All index pairs (i < j) with Hamming(hashes[i], hashes[j]) <= threshold: [P, 2] int64, sorted.

    Found as one int per pair (i * n + j), not a tuple: flat colours, gradients and other low-detail images
    share their pHash, so their pairs grow with the square of their number (700k at 200k generated images).
    """
    n = len(hashes)
    keys: set[int] = set()
    if threshold >= 16:  # chunks of < 4 bits stop pruning; fall back to blocked all-pairs on numpy
        arr = np.array(hashes, dtype=np.uint64)
        for i in range(n):
            x = np.bitwise_xor(arr[i + 1:], arr[i])
            d = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
            keys.update((i * n + i + 1 + np.nonzero(d <= threshold)[0]).tolist())
    else:
        for lo, hi in _chunks(threshold):
            mask = (1 << (hi - lo)) - 1
            buckets: dict[int, list[int]] = defaultdict(list)
            for i, h in enumerate(hashes):
                buckets[(h >> lo) & mask].append(i)
            for members in buckets.values():  # each in increasing index order
                for a in range(len(members) - 1):
                    ia = members[a]
                    ha = hashes[ia]
                    for ib in members[a + 1:]:
                        if (ha ^ hashes[ib]).bit_count() <= threshold:
                            keys.add(ia * n + ib)
    k = np.sort(np.fromiter(keys, np.int64, len(keys)))
    return np.stack([k // max(n, 1), k % max(n, 1)], 1)


def any_within(query: Sequence[str], ref: Sequence[str], threshold: int) -> list[int | None]:
    """For each query hash, the index of a ref hash within ``threshold`` (or None)."""
    q = [int(h, 16) for h in query]
    r = [int(h, 16) for h in ref]
    out: list[int | None] = [None] * len(q)
    if not r:
        return out
    chunks = _chunks(threshold) if threshold < 16 else None
    if chunks is None:
        ra = np.array(r, dtype=np.uint64)
        for i, h in enumerate(q):
            d = np.unpackbits(np.bitwise_xor(ra, np.uint64(h)).view(np.uint8).reshape(-1, 8), axis=1).sum(1)
            j = int(np.argmin(d))
            if d[j] <= threshold:
                out[i] = j
        return out
    tables = []
    for lo, hi in chunks:
        mask = (1 << (hi - lo)) - 1
        t: dict[int, list[int]] = defaultdict(list)
        for j, h in enumerate(r):
            t[(h >> lo) & mask].append(j)
        tables.append((lo, mask, t))
    for i, h in enumerate(q):
        for lo, mask, t in tables:
            for j in t.get((h >> lo) & mask, ()):
                if (h ^ r[j]).bit_count() <= threshold:
                    out[i] = j
                    break
            if out[i] is not None:
                break
    return out
