"""validate: drop images that did not decode, exceed the pixel cap, or fail the size/aspect thresholds."""
from __future__ import annotations

from collections import Counter

from pipeline.core.records import DropReason

from ..table import Context, Counts
from ..validate import size_reason

NAME = "validate"


def decide(rows, ctx: Context) -> Counts:
    c = ctx.c
    dropped: Counter = Counter()
    for r in rows:
        f = ctx.facts.rows.get(r.id)
        if f is None or (not f.get("ok") and not f.get("bomb")):
            r.drop(DropReason.INVALID, (f or {}).get("error") or "not decoded")
        elif f.get("bomb") or f.get("pixels", 0) > c.max_pixels:
            r.drop(DropReason.BOMB, f.get("error") or f"{f.get('pixels')} pixels > cap {c.max_pixels}")
        else:
            reason, detail = size_reason(r.w, r.h, c.min_side, c.max_aspect)
            if reason:
                r.drop(DropReason(reason), detail)
        if not r.kept:
            dropped[r.reason.value] += 1
    return Counts(dropped)
