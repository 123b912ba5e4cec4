"""Steps 4-5: FAISS index (plain faiss can read it) and sub-quadratic near-duplicate groups."""
import json

import numpy as np

from pipeline.core.records import read_index as load_index
from pipeline.core.records import write_index as save_index
from pipeline.curate.index import build_index, index_kind
from curate_groups import near_dup_groups, pick_representatives
from pipeline.curate.neardup import similar_pairs


def planted(n, d, n_dup, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, n_dup, replace=False)
    dup = x[src] + noise * rng.standard_normal((n_dup, d)).astype(np.float32)
    dup /= np.linalg.norm(dup, axis=1, keepdims=True)
    return np.vstack([x, dup]), src


def _recall(labels, n, src):
    return float(np.mean([labels[s] == labels[n + k] for k, s in enumerate(src)]))


def test_exact_range_search_finds_planted_pairs_only():
    emb, src = planted(3000, 64, 200, 0.02)
    labels = near_dup_groups(emb, 0.95)
    assert _recall(labels, 3000, src) == 1.0
    assert len(set(labels.tolist())) == 3000  # random vectors never merge
    rows, cols = similar_pairs(emb, 0.95)
    assert (rows < cols).all() and len(rows) == 200


def test_ivf_path_recall_on_planted_pairs():
    emb, src = planted(6000, 64, 300, 0.02, seed=1)
    labels = near_dup_groups(emb, 0.95, exact_max=100, nprobe=4)  # force IVF
    assert _recall(labels, 6000, src) >= 0.97
    assert len(set(labels.tolist())) >= 6000


def clustered_planted(n, d, n_dup, n_clusters=40, spread=0.05, noise=0.01, seed=0):
    """Tight clusters (same-cluster cosine ~0.5) with planted near copies (cosine ~0.98): cells must
    split clusters, so pairs across cell borders occur."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n_clusters, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, n_dup, replace=False)
    dup = x[src] + noise * rng.standard_normal((n_dup, d)).astype(np.float32)
    dup /= np.linalg.norm(dup, axis=1, keepdims=True)
    return np.vstack([x, dup]), src


def test_cell_path_finds_the_exact_pairs_deterministically():
    import faiss

    emb, src = clustered_planted(6000, 96, 400)
    exact = similar_pairs(emb, 0.95)  # 6400 <= EXACT_MAX: every pair compared
    assert len(exact[0]) >= 400 and (exact[0] < exact[1]).all()
    threads = faiss.omp_get_max_threads()
    runs = [similar_pairs(emb, 0.95, exact_max=100, nlist=64, workers=w) for w in (1, 2, 2)]
    runs.append(similar_pairs(emb, 0.95, exact_max=100, nlist=4, batch=256))  # crowded cells, cut in pieces
    assert faiss.omp_get_max_threads() == threads  # thread settings are restored
    for rows, cols in runs:  # forced through the cells; same pairs, same order, any worker count
        assert np.array_equal(rows, exact[0]) and np.array_equal(cols, exact[1])
    # every reported pair is at or above the threshold (exact re-check), in both paths
    cos = np.einsum("ij,ij->i", emb[exact[0]].astype(np.float64), emb[exact[1]].astype(np.float64))
    assert (cos >= np.float32(0.95)).all()


def test_pairs_just_below_the_threshold_are_never_reported():
    # cosines 0.95 - 3e-5 (inside the coarse pass's slack) and 0.95 + 3e-5, on both paths
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    pairs = []
    for k, c in enumerate([0.95 - 3e-5, 0.95 + 3e-5] * 20):
        a = base[k]
        o = rng.standard_normal(32).astype(np.float32)
        o -= (o @ a) * a
        o /= np.linalg.norm(o)
        pairs.append(c * a + np.sqrt(1 - c * c) * o)
    emb = np.vstack([base, np.array(pairs, np.float32)])
    for kw in ({}, {"exact_max": 10, "nlist": 8, "nprobe": 8}):
        rows, cols = similar_pairs(emb, 0.95, **kw)
        assert sorted(zip(rows.tolist(), cols.tolist())) == [(k, 300 + k) for k in range(1, 40, 2)]


def test_threshold_is_inclusive_and_representative_is_highest_priority():
    a = np.array([[1, 0], [0.95, np.sqrt(1 - 0.95 ** 2)], [0, 1]], np.float32)
    labels = near_dup_groups(a, 0.95)
    assert labels[0] == labels[1] != labels[2]
    rep = pick_representatives(labels, np.array([10.0, 20.0, 5.0]))
    assert rep.tolist() == [1, 1, 2]
    rep = pick_representatives(labels, np.array([20.0, 20.0, 5.0]))  # tie -> first
    assert rep.tolist() == [0, 0, 2]


def test_index_kind_by_size_and_readable_by_plain_faiss(tmp_path):
    import faiss

    small, _ = planted(500, 32, 0, 0.0)
    big, _ = planted(25_000, 16, 0, 0.0, seed=2)
    i1 = build_index(small)
    i2 = build_index(big)
    assert index_kind(i1) == "flat" and index_kind(i2) == "ivf"
    ids = [f"{k:064x}" for k in range(len(big))]
    save_index(i2, ids, tmp_path / "i.faiss", tmp_path / "i.json")
    plain = faiss.read_index(str(tmp_path / "i.faiss"))
    assert plain.ntotal == len(big)
    _, I = plain.search(big[:50], 1)
    assert (I[:, 0] == np.arange(50)).mean() > 0.9
    assert json.load(open(tmp_path / "i.json"))[7] == ids[7]
    idx, got = load_index(tmp_path / "i.faiss", tmp_path / "i.json")
    assert idx.ntotal == len(got)
