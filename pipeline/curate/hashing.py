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
from typing import Optional, Sequence

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


def thumbs_array(encoded: Sequence[Optional[str]]) -> np.ndarray:
    """[N, 256] float32 of base64 thumbnails; a missing one is a row of NaN (it never confirms)."""
    out = np.full((len(encoded), THUMB_SIDE * THUMB_SIDE), np.nan, np.float32)
    for i, t in enumerate(encoded):
        if t:
            out[i] = np.frombuffer(base64.b64decode(t), np.uint8)
    return out


def pixel_diff(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255) of the thumbnails of pairs (a[k], b[k]); NaN when one is missing.

    Re-encoded, resized and recompressed copies differ by < 2 on 16×16 thumbnails (handwritten
    digits at 32 px, the hardest case measured, and photos at JPEG quality 20 or a quarter of
    their size); distinct low-detail images whose pHashes collide differ by > 6.
    """
    if len(a) == 0:
        return np.zeros(0, np.float32)
    return np.abs(thumbs[np.asarray(a)] - thumbs[np.asarray(b)]).mean(1)


def _chunks(threshold: int) -> list[tuple[int, int]]:
    m = min(threshold + 1, 64)
    bounds = np.linspace(0, 64, m + 1).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(m)]


def near_pairs(hashes: Sequence[int], threshold: int) -> list[tuple[int, int]]:
    """All index pairs (i < j) with Hamming(hashes[i], hashes[j]) <= threshold."""
    pairs: set[tuple[int, int]] = set()
    if threshold >= 16:  # chunks of < 4 bits stop pruning; fall back to blocked all-pairs on numpy
        arr = np.array(hashes, dtype=np.uint64)
        for i in range(len(arr)):
            x = np.bitwise_xor(arr[i + 1:], arr[i])
            d = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
            for j in np.nonzero(d <= threshold)[0]:
                pairs.add((i, i + 1 + int(j)))
        return sorted(pairs)
    for lo, hi in _chunks(threshold):
        mask = (1 << (hi - lo)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            buckets[(h >> lo) & mask].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            for a in range(len(members)):
                ia = members[a]
                ha = hashes[ia]
                for b in range(a + 1, len(members)):
                    ib = members[b]
                    if (ha ^ hashes[ib]).bit_count() <= threshold:
                        pairs.add((ia, ib) if ia < ib else (ib, ia))
    return sorted(pairs)


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
