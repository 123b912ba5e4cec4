"""phash_dedup: perceptual duplicates, within and across classes. A pHash match (64-bit, Hamming <=
``phash_threshold``) is only a candidate: it is confirmed when the two images' 16×16 greyscale
thumbnails differ by at most ``phash_max_pixel_diff`` (mean absolute difference, 0-255). Low-detail
images (digits, icons, line art) collide on pHash without being copies; their pixels tell them apart.
Each dropped image names the kept image it copies (:func:`..table.duplicate_drops`)."""
from __future__ import annotations

import numpy as np

from pipeline.core.records import DropReason

from ..hashing import near_pairs, pixel_diff, thumbs_array
from ..table import Context, Counts, alive, duplicate_drops, refuse_mass_drop

NAME = "phash_dedup"


def decide(rows, ctx: Context) -> Counts:
    c = ctx.c
    t, m = c.phash_threshold, c.phash_max_pixel_diff
    ids = alive(rows)
    pairs = near_pairs([int(rows[i].phash, 16) for i in ids], t)
    thumbs = thumbs_array([ctx.facts.rows.get(rows[i].id, {}).get("thumb") for i in ids])
    diff = pixel_diff(thumbs, pairs[:, 0], pairs[:, 1])
    ok = diff <= m  # NaN (no thumbnail) never confirms
    a, b, d = pairs[ok, 0], pairs[ok, 1], diff[ok]
    ph = [(int(rows[ids[x]].phash, 16) ^ int(rows[ids[y]].phash, 16)).bit_count() for x, y in zip(a, b)]
    dropped = duplicate_drops(rows, ids, a, b, DropReason.PHASH_DUP,
                              lambda k: f"pHash {ph[k]} <= {t}, pixels {d[k]:.1f} <= {m}")
    refuse_mass_drop(NAME, dropped, len(ids), c.max_dup_share,
                     f"lower --curate.phash_threshold (now {t}) or --curate.phash_max_pixel_diff (now {m})")
    return Counts(dropped, {"pairs": len(pairs), "unconfirmed": int(len(pairs) - ok.sum())})
