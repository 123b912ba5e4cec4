"""Step 5 of curation: semantic near-duplicates in embedding space.

Pairs with cosine >= threshold are found by blocked matrix products over *blocks of rows*, never
an N x N matrix, in two passes:

1. coarse (float32 BLAS): every block ``Q @ M.T`` keeps the pairs within ``_SLACK`` of the
   threshold. Small pools (``n <= exact_max``) tile all N^2/2 pairs (exact). Large pools are
   partitioned into cells first (spherical k-means on a 64-d PCA projection of the rows; a
   projection only shrinks distances, so near-duplicates stay in the same or a neighbouring cell)
   and each row is compared with the members of its ``nprobe`` nearest cells only: near-duplicates
   are so close that they almost always share a cell (the bench measures the recall of planted
   duplicates; cost ~ N * nprobe * N / nlist instead of N^2).
2. exact re-check (float64 dot products of the candidate pairs): the one definition of "similar"
   for both paths, so no pair below the threshold is ever reported and the result does not depend
   on BLAS summation order or thread count.

Components of the similarity graph (scipy connected components) become groups; the caller keeps
one representative per group. The coarse pass runs on a small thread pool with single-threaded
BLAS/OpenMP per task: on a shared machine, spinning OpenMP teams are several times slower than
plain threads that the OS can schedule (measured in ``bench/curate_bench.py neardup``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("kd3.curate")

EXACT_MAX = 50_000
PCA_DIM = 64          # dimension of the projection the cells are built in
_SLACK = 1e-4         # coarse float32 cut = threshold - _SLACK (float32 dot error on unit rows is ~1e-6)
_CHUNK = 65536        # rows per projection/assignment task, pairs per re-check chunk


def similar_pairs(emb: np.ndarray, threshold: float, *, exact_max: int = EXACT_MAX, nprobe: int = 2,
                  nlist: int | None = None, batch: int = 2048,
                  workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows i, cols j), sorted, with i < j and dot(emb[i], emb[j]) >= threshold (cosine for unit rows).

    ``n <= exact_max``: every pair is compared (tiles of ``batch`` rows). Larger: rows are compared
    within their ``nprobe`` nearest of ``nlist`` (default ~2 sqrt(N)) cells. ``workers``: threads
    (default: the CPUs this process may use, at most 8).
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb) if emb.ndim == 2 else 0
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    workers = workers or default_workers()
    if n <= exact_max:
        blocks = [(slice(i, min(n, i + batch)), slice(j, min(n, j + batch)))
                  for i in range(0, n, batch) for j in range(i, n, batch)]
    else:
        blocks = cell_blocks(emb, nlist or max(16, int(2 * math.sqrt(n))), nprobe, workers, batch)
    rows, cols = candidate_pairs(emb, blocks, threshold - _SLACK, workers)
    return recheck(emb, rows, cols, threshold)


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


@contextlib.contextmanager
def single_threaded():
    """BLAS and faiss's OpenMP at one thread in this thread (restored after): parallelism comes from
    the caller's thread pool instead."""
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def _pool_map(fn, items, workers: int) -> list:
    def task(item):
        import faiss

        faiss.omp_set_num_threads(1)  # OpenMP settings are per thread
        return fn(item)

    with single_threaded(), ThreadPoolExecutor(workers) as ex:
        return list(ex.map(task, items))


def cell_blocks(emb: np.ndarray, nlist: int, nprobe: int, workers: int, batch: int = 4096,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition rows into ``nlist`` cells; blocks per cell = (rows probing it, rows whose nearest it is),
    each side cut into pieces of at most ``batch`` rows (a crowded cell never makes a huge product)."""
    import faiss

    n, d = emb.shape
    nlist = min(nlist, n)
    nprobe = max(1, min(nprobe, nlist))
    rng = np.random.default_rng(seed)
    sample = emb[np.sort(rng.choice(n, size=min(n, 32 * nlist), replace=False))]
    mean = sample.mean(0)
    dr = min(PCA_DIM, d)
    if dr < d:
        centred = sample - mean
        _, vecs = np.linalg.eigh((centred.T @ centred).astype(np.float64))
        proj = np.ascontiguousarray(vecs[:, ::-1][:, :dr].astype(np.float32))
    else:
        proj = None

    def project(x: np.ndarray) -> np.ndarray:
        y = (x - mean) @ proj if proj is not None else np.array(x, np.float32)
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    km = faiss.Kmeans(dr, nlist, niter=10, seed=1234 + seed, spherical=True, max_points_per_centroid=32,
                      min_points_per_centroid=1)
    with single_threaded():
        km.train(project(sample))
    quantizer = faiss.IndexFlatIP(dr)
    quantizer.add(km.centroids)
    starts = list(range(0, n, _CHUNK))
    near = np.concatenate(_pool_map(lambda s: quantizer.search(project(emb[s:s + _CHUNK]), nprobe)[1],
                                    starts, workers)).astype(np.int64)
    members = _group_by(near[:, 0], nlist)
    probers = _group_by(near.ravel(), nlist, np.repeat(np.arange(n, dtype=np.int64), nprobe))
    sizes = np.array([len(m) for m in members])
    log.info("near-dup cells: %d (sizes max %d, mean %.0f), %d probes per row", nlist, sizes.max(),
             sizes.mean(), nprobe)
    return [(p[i:i + batch], m[j:j + batch]) for p, m in zip(probers, members)
            for i in range(0, len(p), batch) for j in range(0, len(m), batch)]


def _group_by(keys: np.ndarray, k: int, values: np.ndarray | None = None) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    vals = order if values is None else values[order]
    bounds = np.searchsorted(keys[order], np.arange(k + 1))
    return [vals[bounds[c]:bounds[c + 1]] for c in range(k)]


def candidate_pairs(emb: np.ndarray, blocks, cut: float, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (i < j) pairs with float32 ``emb[i] @ emb[j] >= cut`` among each block's (rows, cols)."""
    n = len(emb)

    def block(qm):
        q, m = qm
        s = emb[q] @ emb[m].T
        r, c = np.nonzero(s >= cut)
        a = r + q.start if isinstance(q, slice) else q[r]
        b = c + m.start if isinstance(m, slice) else m[c]
        keep = a != b
        a, b = a[keep], b[keep]
        return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)

    keys = np.unique(np.concatenate([np.zeros(0, np.int64), *_pool_map(block, blocks, workers)]))
    return keys // n, keys % n


def recheck(emb: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the pairs whose float64 dot product is >= threshold (taken at float32, the rows' precision)."""
    threshold = float(np.float32(threshold))
    keep = np.zeros(len(rows), bool)
    for s in range(0, len(rows), _CHUNK):
        a = emb[rows[s:s + _CHUNK]].astype(np.float64)
        b = emb[cols[s:s + _CHUNK]].astype(np.float64)
        keep[s:s + _CHUNK] = np.einsum("ij,ij->i", a, b) >= threshold
    return rows[keep], cols[keep]


def group_labels(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected-component label per item (labels are arbitrary ints)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    g = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels
