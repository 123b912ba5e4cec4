"""The near-duplicate cut measured on the pool itself (``curate.near_dup_threshold: auto``).

Cosine similarities are not comparable across embedding models. On the demo's digit world, re-encoded
copies sit at cosine >= 0.995 under the teacher's pooled features, yet half the images have an unrelated
neighbour above 0.98 (CLIP's usual 0.95 merged 78 % of that pool); under a random-weight CLIP even 0.998
is passed by a third of the unrelated neighbours. So the cut is measured, per pool, from two samples:

* **planted copies**: a fixed sample of the pool (``PLANT_N``) is re-encoded the way copies on the web
  are (alternately ×0.75 at JPEG quality 50 and ×1.25 at quality 75) and embedded during the scan
  (cached as ``copy:<sha>``). ``t_copy`` = the cut that catches 95 % of them.
* **unrelated neighbours**: for another fixed sample (``NEIGHBOUR_N``), the most similar pool image that
  is *not* a pixel copy (16×16 thumbnails differ by more than ``phash_max_pixel_diff``).
  ``t_unrelated`` = their 99th percentile: about 1 % of images have an unrelated neighbour above it.
  (An edited copy counts as unrelated here, which can only raise the cut.)

The cut is ``max(t_copy, t_unrelated)``: no looser than copies need, never so loose that more than ~1 %
of images meet an unrelated one. When ``t_unrelated > t_copy`` the embeddings cannot tell copies from
unrelated images apart; the cut stays safe and the share of planted copies it still catches says how
little near-dup can do with them.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np

from .hashing import Thumbs, pixel_diff
from .scan import work_side
from .shards import bounded_map
from .validate import inspect_image

PLANT_N = 256
NEIGHBOUR_N = 1000
COPY_PREFIX = "copy:"
COPY_CATCH = 0.95         # share of planted copies the cut must catch (when it safely can)
UNRELATED_Q = 99.8
TOP_K = 16
TOP_OF_SCALE = 0.9999     # a cut at or above this only merges images whose features are identical


def sample(shas: list[str], n: int) -> list[str]:
    """A fixed sample: the ``n`` smallest sha256s (random with respect to content, stable across reruns)."""
    return sorted(shas)[:n]


def planted_copy(rgb, k: int, side: Optional[int] = None):
    """The k-th planted copy of a decoded image: downscaled ×0.75 at JPEG 50, or upscaled ×1.25 at JPEG 75,
    then decoded as the scan decodes a file (at the working size ``side``, :func:`.scan.work_side`)."""
    from PIL import Image

    scale, quality = (0.75, 50) if k % 2 == 0 else (1.25, 75)
    size = (max(8, round(rgb.width * scale)), max(8, round(rgb.height * scale)))
    buf = io.BytesIO()
    rgb.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return inspect_image(buf.getvalue(), size[0] * size[1], side)[1]


def planted_sample(items: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The decodable (sha, file) pairs whose copies are planted, in the order :func:`plant_copies` numbers them."""
    chosen = set(sample([s for s, _ in items], PLANT_N))
    return sorted(x for x in items if x[0] in chosen)


def plant_copies(items: list[tuple[str, Path]], embedder, emb_cache, c) -> int:
    """Embed a planted copy of each sampled image (``items``: decodable (sha, file)) not cached yet."""
    todo = [(k, s, p) for k, (s, p) in enumerate(planted_sample(items)) if COPY_PREFIX + s not in emb_cache]

    side = work_side(embedder)

    def work(item):
        k, sha, path = item
        _, rgb = inspect_image(Path(path).read_bytes(), c.max_pixels)  # the original, as web copies are made
        return sha, (embedder.prepare(planted_copy(rgb, k, side)) if rgb is not None else None)

    ids, xs = [], []
    for sha, x in bounded_map(work, todo, c.workers, max(2 * c.batch_size, 8)):
        if x is not None:
            ids.append(COPY_PREFIX + sha)
            xs.append(x)
    for start in range(0, len(xs), c.batch_size):
        emb, _ = embedder.embed(embedder.collate(xs[start:start + c.batch_size]))
        emb_cache.add_part(ids[start:start + c.batch_size], emb, None)
    return len(ids)


def _unrelated_neighbours(X: np.ndarray, thumbs: Thumbs, max_pixel_diff: float, ids: list[str],
                          chunk: int = 2048) -> np.ndarray:
    """For a fixed sample of rows (those whose ``ids`` come first in sorted order: chosen by content, not by
    the rows' order), the cosine of the most similar other row that is not a pixel copy."""
    n = len(X)
    q = np.sort(np.argsort(np.asarray(ids), kind="stable")[:NEIGHBOUR_N])
    k = min(TOP_K, n - 1)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    Xq = X[q]
    rows = np.arange(len(q))
    # top-k of the sample against every row, ``chunk`` rows at a time: the sample (1,000) x chunk products and
    # their candidate arrays stay ~50 MB whatever the pool's size (16,384 rows took ~460 MB)
    for start in range(0, n, chunk):
        S = Xq @ X[start:start + chunk].T
        inside = (q >= start) & (q < start + S.shape[1])
        S[rows[inside], q[inside] - start] = -np.inf  # not itself
        cand_s = np.concatenate([best_s, S], 1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + S.shape[1]), S.shape)], 1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    diff = pixel_diff(thumbs, np.repeat(q, k), best_i.ravel()).reshape(len(q), k)
    unrelated = ~(diff <= max_pixel_diff)  # a missing thumbnail counts as unrelated (raises the cut)
    first = np.where(unrelated.any(1), unrelated.argmax(1), k - 1)
    return best_s[np.arange(len(q)), first]


def calibrate(X: np.ndarray, thumbs: Thumbs, originals: np.ndarray, copies: np.ndarray,
              max_pixel_diff: float, ids: list[str]) -> dict:
    """The cut for pool embeddings ``X`` (rows L2-normalised, ``thumbs`` their thumbnails, ``ids`` their
    sha256s, which pick the neighbour sample) given planted (original, copy) embedding pairs; returns the
    cut and what it rests on (stored in the manifest)."""
    cs = (originals * copies).sum(1) if len(copies) else np.zeros(0, np.float32)
    t_copy = float(np.percentile(cs, 100 * (1 - COPY_CATCH))) if len(cs) else None
    nn = _unrelated_neighbours(X, thumbs, max_pixel_diff, ids) if len(X) > 1 else np.zeros(0, np.float32)
    t_unrel = float(np.percentile(nn, UNRELATED_Q)) if len(nn) else None
    known = [x for x in (t_copy, t_unrel) if x is not None]
    cut = float(min(1.0, max(known))) if known else 1.0
    return {"threshold": round(cut, 6), "t_copy": t_copy, "t_unrelated": t_unrel, "copies": int(len(cs)),
            "copies_caught": float((cs >= cut).mean()) if len(cs) else None, "neighbours_sampled": int(len(nn)),
            "unrelated_above": float((nn >= cut).mean()) if len(nn) else None, "at_top": cut >= TOP_OF_SCALE}
