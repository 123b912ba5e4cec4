"""near_dedup: semantic near-duplicates (embedding cosine >= ``near_dup_threshold``, FAISS range
search), within and across classes; each group keeps its highest-resolution image."""
from __future__ import annotations

import numpy as np

from pipeline.core.records import DropReason

from ..neardup import near_dup_groups
from ..table import Context, Counts, alive, representative_drops

NAME = "near_dedup"


def decide(rows, ctx: Context) -> Counts:
    t = ctx.c.near_dup_threshold
    ids = [i for i in alive(rows) if rows[i].id in ctx.emb]
    groups = near_dup_groups(ctx.emb.matrix([rows[i].id for i in ids]), t) if ids else np.zeros(0, int)
    return Counts(representative_drops(rows, ids, groups, DropReason.NEAR_DUP, f"cosine >= {t}"))
