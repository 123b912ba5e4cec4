"""relevance: with ``curate.relevance_filter``, drop an image whose top zero-shot label is another
class beating its query class by more than ``relevance_margin`` (scores are kept either way)."""
from __future__ import annotations

from collections import Counter

from pipeline.core.records import DropReason

from ..relevance import off_class
from ..table import Context, Counts, alive

NAME = "relevance"


def decide(rows, ctx: Context) -> Counts:
    c = ctx.c
    dropped: Counter = Counter()
    if c.relevance_filter and ctx.scores:
        for i in alive(rows):
            if i not in ctx.scores:
                continue
            s, r = ctx.scores[i], rows[i]
            drop, top = off_class(s, r.label, c.relevance_margin)
            if drop:
                r.drop(DropReason.OFF_CLASS, f"top {ctx.names[top]!r} {s[top]:.3f} > {r.cls!r} "
                                             f"{s[r.label]:.3f} + {c.relevance_margin}")
                dropped["off_class"] += 1
    return Counts(dropped, {"filter": bool(c.relevance_filter)})
