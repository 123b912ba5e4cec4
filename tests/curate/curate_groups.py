"""Grouping helpers the curate tests check the algorithms with (production curate groups duplicates as stars
in pipeline/curate/table.py; these are the plain component views of the same pairs)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.curate.hashing import near_pairs
from pipeline.curate.neardup import group_labels, similar_pairs


def hamming(a: int, b: int) -> int:
    return int(a ^ b).bit_count()


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def components(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Connected-component root of each of n items given its edges (root = smallest index)."""
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    return [uf.find(i) for i in range(n)]


def phash_groups(hex_hashes: Sequence[str], threshold: int) -> list[int]:
    """Component root per item for pHash Hamming distance <= threshold."""
    ints = [int(h, 16) for h in hex_hashes]
    return components(len(ints), near_pairs(ints, threshold))


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
    return np.array([rep_of_label[int(lab)] for lab in labels], dtype=np.int64)
