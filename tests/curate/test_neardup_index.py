"""Steps 4-5: FAISS index (plain faiss can read it) and sub-quadratic near-duplicate groups."""
import json

import numpy as np

from pipeline.core.records import read_index as load_index
from pipeline.core.records import write_index as save_index
from pipeline.curate.index import build_index, index_kind
from pipeline.curate.neardup import near_dup_groups, pick_representatives, similar_pairs


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
