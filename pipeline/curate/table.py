"""The facts table the curate steps decide over: one :class:`Decision` per (class, image), plus the
context every step may read (config, caches, class scores). Steps mark rows with ``row.drop(...)``;
the driver counts what each step did (:class:`Counts`) and writes the table as ``decisions.jsonl``.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.records import Decision, DropReason

from .relevance import label_embeddings, label_names, zero_shot
from .sources import Candidate


MASS_DROP_MIN = 10  # fewer drops than this never stop a run (a tiny pool may be half copies)


class Scores:
    """Class scores per row of the facts table (row -> a score per label), one float32 matrix: an array per
    row would cost ~110 B beside its data. A row without scores (no embedding) is not in it."""

    def __init__(self, n: int = 0, width: int = 0):
        self.m = np.zeros((n, width), np.float32)
        self.has = np.zeros(n, bool)

    def __setitem__(self, i: int, values) -> None:
        self.m[i] = values
        self.has[i] = True

    def __contains__(self, i: object) -> bool:
        return isinstance(i, (int, np.integer)) and 0 <= i < len(self.has) and bool(self.has[i])

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self:
            raise KeyError(i)
        return self.m[i]

    def __bool__(self) -> bool:
        return bool(self.has.any())


@dataclass
class Context:
    c: Any                              # the curate config section
    classes: list[str]
    facts: Any                          # scan.FactsCache: sha -> decode facts
    emb: Any                            # embed.EmbeddingCache: sha -> embedding
    collapsed: int = 0                  # (class, sha) repeats folded while loading: exact duplicates
    eval_files: list[tuple[str, Path]] = field(default_factory=list)   # decontamination set (sha, file)
    scores: Scores = field(default_factory=Scores)                      # row -> score per label
    names: list[str] = field(default_factory=list)                     # label names of the score columns
    trusted: bool = False               # scores come from trained weights (may break ties)


@dataclass
class Counts:
    """What one step did: drops by reason, plus any figure it reports beside them."""

    dropped: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)


def alive(rows: list[Decision]) -> list[int]:
    return [i for i, r in enumerate(rows) if r.kept]


def build_rows(cands: list[Candidate], facts) -> list[Decision]:
    rows = []
    for x in cands:
        f = facts.rows.get(x.sha, {})
        rows.append(Decision(id=x.sha, cls=x.cls, label=x.label, path=x.path, url=x.url,
                             w=int(f.get("w") or 0), h=int(f.get("h") or 0), phash=f.get("phash")))
    return rows


def score(rows: list[Decision], ctx: Context, embedder) -> None:
    """Class scores for every row with an embedding: CLIP zero-shot (``clip_scores``, ``clip_top``) or
    the teacher's probabilities (``teacher_conf``). Relevance filters on them; exact dedup breaks ties."""
    c = ctx.c
    emb_rows = [i for i, r in enumerate(rows) if r.id in ctx.emb]
    ctx.names = label_names(ctx.classes, c.negative_prompts if embedder.has_text else None)
    if emb_rows and embedder.has_text:
        L = label_embeddings(embedder, ctx.classes, c.prompt_templates, c.negative_prompts)
        P = zero_shot(ctx.emb.matrix([rows[i].id for i in emb_rows]), L, embedder.logit_scale())
        ctx.scores = Scores(len(rows), P.shape[1])
        for k, i in enumerate(emb_rows):
            ctx.scores[i] = P[k]
            rows[i].clip_scores = [round(float(v), 6) for v in P[k, :len(ctx.classes)]]
            rows[i].clip_top = ctx.names[int(np.argmax(P[k]))]
    elif emb_rows:
        cmap = getattr(embedder, "class_map", [])
        ctx.scores = Scores(len(rows), len(cmap))
        for i in emb_rows:
            probs = ctx.emb.extra_of(rows[i].id)
            if probs is None:
                continue
            mapped = np.array([probs[j] if j is not None else 0.0 for j in cmap], np.float32)
            ctx.scores[i] = mapped
            rows[i].teacher_conf = round(float(mapped[rows[i].label]), 6)
    ctx.trusted = embedder.trained and bool(ctx.scores)


def duplicate_drops(rows: list[Decision], ids: list[int], a: np.ndarray, b: np.ndarray, reason: DropReason,
                    describe: Callable[[int], str]) -> Counter:
    """Drop duplicates given as pairs (``ids[a[k]]``, ``ids[b[k]]``); ``describe(k)`` says why pair k matched.

    Groups are stars, not connected components: a dropped row is always a direct duplicate of the kept row
    its ``dup_of`` names, so a chain A~B~C of which A and C are unlike keeps both A and C. Representatives,
    in turn: the member with the most duplicates (the one the others are copies of: an original sits
    between its re-encodes), then the earliest crawled. Size is no criterion: an upscaled re-encode has
    more pixels than its original but no more detail, and must not win over it.
    """
    n = len(ids)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    deg = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    nbrs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for k, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        nbrs[x].append((y, k))
        nbrs[y].append((x, k))
    taken = np.zeros(n, bool)
    dropped: Counter = Counter()
    for rep in sorted(np.flatnonzero(deg).tolist(), key=lambda x: (-int(deg[x]), x)):
        if taken[rep]:
            continue
        taken[rep] = True
        j = ids[rep]
        for m, k in sorted(nbrs[rep]):
            if taken[m]:
                continue
            taken[m] = True
            i = ids[m]
            why = DropReason.CROSS_CLASS_DUP if rows[j].cls != rows[i].cls else reason
            rows[i].drop(why, f"{describe(k)} of {rows[j].id[:16]} ({rows[j].cls}, {rows[j].w}x{rows[j].h})",
                         rows[j].id)
            dropped[why.value] += 1
    return dropped


def refuse_mass_drop(step: str, dropped: Counter, n_in: int, max_share: float, fix: str) -> None:
    """Stop curate (before anything is written) when a dedup step would drop more than ``max_share`` of
    its input: a threshold that merges unlike images looks exactly like this, and silently losing a
    third of the data is worse than a clear stop. ``fix`` names the setting to change."""
    n = sum(dropped.values())
    if n_in and n >= MASS_DROP_MIN and n / n_in > max_share:
        raise DataError(f"curate: {step} would drop {n} of {n_in} images ({n / n_in:.0%}, more than "
                        f"curate.max_dup_share {max_share:.0%}); {fix}, or set --curate.max_dup_share 1 if "
                        f"the pool really is mostly duplicates. Nothing was written")
