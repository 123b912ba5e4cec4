"""Step 5 of curation: semantic near-duplicates in embedding space.

Pairs with cosine >= threshold are found with FAISS *range search* (never an N x N matrix):
exact ``IndexFlatIP`` for small pools, ``IndexIVFFlat`` with a modest ``nprobe`` for large ones
(near-duplicates are so close that they almost always share an inverted list: the bench measures
the recall of planted duplicates). Components of the similarity graph (scipy connected
components) become groups; the caller keeps one representative per group.
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

EXACT_MAX = 50_000


def similar_pairs(emb: np.ndarray, threshold: float, *, exact_max: int = EXACT_MAX, nprobe: int = 4,
                  nlist: int | None = None, batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(rows i, cols j) with i < j and cos(emb[i], emb[j]) >= threshold."""
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape if emb.ndim == 2 else (0, 0)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        # many small lists (~4 sqrt(N)) keep each probe cheap; an HNSW quantizer keeps the
        # assignment of N vectors to thousands of lists cheap too
        nlist = nlist or max(16, int(4 * math.sqrt(n)))
        quantizer = (faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if nlist > 1024
                     else faiss.IndexFlatIP(d))
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.max_points_per_centroid = 32
        rng = np.random.default_rng(0)
        sample = emb[np.sort(rng.choice(n, size=min(n, 32 * nlist), replace=False))]
        index.train(sample)
        index.nprobe = nprobe
        if nlist > 1024:
            quantizer.hnsw.efSearch = max(32, 2 * nprobe)
    index.add(emb)
    # faiss returns sim > radius for inner product; nudge so that == threshold counts too
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))
    rows, cols = [], []
    for start in range(0, n, batch):
        q = emb[start:start + batch]
        lims, _, idx = index.range_search(q, radius)
        counts = np.diff(lims).astype(np.int64)
        qi = np.repeat(np.arange(start, start + len(q), dtype=np.int64), counts)
        keep = idx > qi
        rows.append(qi[keep])
        cols.append(idx[keep].astype(np.int64))
    return np.concatenate(rows), np.concatenate(cols)


def group_labels(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected-component label per item (labels are arbitrary ints)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    g = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels


def near_dup_groups(emb: np.ndarray, threshold: float, **kw) -> np.ndarray:
    rows, cols = similar_pairs(emb, threshold, **kw)
    return group_labels(len(emb), rows, cols)


def pick_representatives(labels: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Representative row per item: in each group the row with the highest priority
    (ties -> lowest row). Returns rep[i] (== i for representatives)."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), -np.asarray(priority, dtype=np.float64), labels))
    rep_of_label = {}
    sl = labels[order]
    first = np.ones(n, bool)
    first[1:] = sl[1:] != sl[:-1]
    for pos in np.nonzero(first)[0]:
        rep_of_label[int(sl[pos])] = int(order[pos])
    return np.array([rep_of_label[int(l)] for l in labels], dtype=np.int64)
