"""phash_dedup: perceptual duplicates (64-bit pHash within ``phash_threshold``), within and across
classes; each group keeps its highest-resolution image."""
from __future__ import annotations

import numpy as np

from pipeline.core.records import DropReason

from ..hashing import phash_groups
from ..table import Context, Counts, alive, representative_drops

NAME = "phash_dedup"


def decide(rows, ctx: Context) -> Counts:
    t = ctx.c.phash_threshold
    ids = alive(rows)
    groups = phash_groups([rows[i].phash for i in ids], t) if ids else np.zeros(0, int)
    return Counts(representative_drops(rows, ids, groups, DropReason.PHASH_DUP, f"pHash <= {t}"))
