"""exact_dedup: the same file (sha256) under several classes is kept once: under the class it scores
highest for when the scores come from trained weights, else where it was seen first."""
from __future__ import annotations

from collections import Counter, defaultdict

from pipeline.core.records import DropReason

from ..table import Context, Counts, alive

NAME = "exact_dedup"


def decide(rows, ctx: Context) -> Counts:
    # repeats within one class were folded while loading: they count here
    dropped = Counter({"exact_dup": ctx.collapsed}) if ctx.collapsed else Counter()
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i in alive(rows):
        by_sha[rows[i].id].append(i)
    for sha, idx in by_sha.items():
        if len(idx) < 2:
            continue
        if ctx.trusted:
            win = max(idx, key=lambda i: (float(ctx.scores[i][rows[i].label]) if i in ctx.scores else -1, -i))
        else:
            win = idx[0]
        for i in idx:
            if i != win:
                rows[i].drop(DropReason.CROSS_CLASS_DUP, f"same file kept under class {rows[win].cls!r}", sha)
                dropped["cross_class_dup"] += 1
    return Counts(dropped)
