"""A FAISS index of the kept embeddings (cosine = inner product).

Embeddings are L2-normalised, so inner product is cosine similarity. The index kind is chosen
by size: exact ``IndexFlatIP`` up to ``FLAT_MAX`` vectors, ``IndexIVFFlat`` (nlist ~ 4 sqrt(N),
nprobe stored in the index) up to ``IVF_MAX``, ``IndexHNSWFlat`` beyond. The id map
(row -> image sha256) is saved next to it as JSON by :func:`pipeline.core.records.write_index`, so
plain ``faiss.read_index`` + ``json.load`` is all a user needs.
"""
from __future__ import annotations

import logging
import math

import numpy as np


log = logging.getLogger("kd3.curate")

FLAT_MAX = 20_000
IVF_MAX = 5_000_000


def _ivf(d: int, n: int, nlist: int | None = None, nprobe: int = 8):
    import faiss  # heavy: loaded when an index is built, not when curate starts

    nlist = nlist or max(16, min(65536, int(4 * math.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = nprobe
    return index


def _train_sample(emb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    if len(emb) <= k:
        return emb
    rng = np.random.default_rng(seed)
    return emb[np.sort(rng.choice(len(emb), size=k, replace=False))]


def build_index(emb: np.ndarray, kind: str = "auto"):
    """Build (and fill) a FAISS index over ``emb`` [N, D] float32 L2-normalised."""
    import faiss  # heavy: loaded when an index is built, not when curate starts

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else ("ivf" if n <= IVF_MAX else "hnsw")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        index = _ivf(d, n)
        index.train(_train_sample(emb, 40 * index.nlist))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if n:
        index.add(emb)
    return index


def index_kind(index) -> str:
    import faiss  # heavy: loaded when an index is built, not when curate starts

    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return type(index).__name__
