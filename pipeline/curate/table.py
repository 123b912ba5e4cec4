"""The facts table the curate steps decide over: one :class:`Decision` per (class, image), plus the
context every step may read (config, caches, class scores). Steps mark rows with ``row.drop(...)``;
the driver counts what each step did (:class:`Counts`) and writes the table as ``decisions.jsonl``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.records import Decision, DropReason

from .neardup import pick_representatives
from .relevance import label_embeddings, label_names, zero_shot
from .sources import Candidate


@dataclass
class Context:
    c: Any                              # the curate config section
    classes: list[str]
    facts: Any                          # scan.FactsCache: sha -> decode facts
    emb: Any                            # embed.EmbeddingCache: sha -> embedding
    collapsed: int = 0                  # (class, sha) repeats folded while loading: exact duplicates
    eval_files: list[tuple[str, Path]] = field(default_factory=list)   # decontamination set (sha, file)
    scores: dict[int, np.ndarray] = field(default_factory=dict)       # row -> score per label
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
        for k, i in enumerate(emb_rows):
            ctx.scores[i] = P[k]
            rows[i].clip_scores = [round(float(v), 6) for v in P[k, :len(ctx.classes)]]
            rows[i].clip_top = ctx.names[int(np.argmax(P[k]))]
    elif emb_rows:
        cmap = getattr(embedder, "class_map", [])
        for i in emb_rows:
            probs = ctx.emb.extra.get(rows[i].id)
            if probs is None:
                continue
            mapped = np.array([probs[j] if j is not None else 0.0 for j in cmap], np.float32)
            ctx.scores[i] = mapped
            rows[i].teacher_conf = round(float(mapped[rows[i].label]), 6)
    ctx.trusted = embedder.trained and bool(ctx.scores)


def representative_drops(rows: list[Decision], ids: list[int], labels, reason, what: str) -> Counter:
    """Within each group of ``labels`` keep the highest-resolution row; drop the rest as ``reason``
    duplicates of it (``cross_class_dup`` when it belongs to another class)."""
    prio = np.array([rows[i].w * rows[i].h for i in ids], dtype=np.float64)
    rep = pick_representatives(np.asarray(labels), prio)
    dropped: Counter = Counter()
    for k, i in enumerate(ids):
        j = ids[int(rep[k])]
        if j == i:
            continue
        why = DropReason.CROSS_CLASS_DUP if rows[j].cls != rows[i].cls else reason
        rows[i].drop(why, f"{what} of {rows[j].id[:16]} ({rows[j].cls}, {rows[j].w}x{rows[j].h})", rows[j].id)
        dropped[why.value] += 1
    return dropped
