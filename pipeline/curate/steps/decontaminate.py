"""decontaminate: drop web images that copy an evaluation image (``curate.decontaminate``): the same
sha256, a pHash within ``phash_threshold``, or an embedding at cosine >= ``decontam_threshold``."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from pipeline.core.records import DropReason

from ..decontam import match
from ..table import Context, Counts, alive

NAME = "decontaminate"
log = logging.getLogger("kd3.curate")


def decide(rows, ctx: Context) -> Optional[Counts]:
    c = ctx.c
    if c.decontaminate is None:
        return None
    ev_ok = [(s, p) for s, p in ctx.eval_files if ctx.facts.rows.get(s, {}).get("ok")]
    if len(ctx.eval_files) > len(ev_ok):
        log.warning("curate: %d evaluation images under %s do not decode and are not used",
                    len(ctx.eval_files) - len(ev_ok), c.decontaminate)
    if not ev_ok:
        log.warning("curate: no decodable evaluation images under %s: nothing to decontaminate against",
                    c.decontaminate)
    ids = alive(rows)
    ev_sha = [s for s, _ in ev_ok]
    ev_emb_sha = [s for s in ev_sha if s in ctx.emb]
    web_sha = [rows[i].id for i in ids]
    # exact + pHash against all eval images, embeddings against those embedded
    m1 = match(web_sha, [rows[i].phash for i in ids], None, ev_sha, [ctx.facts.rows[s]["phash"] for s in ev_sha],
               None, c.phash_threshold, c.decontam_threshold)
    m2 = match(web_sha, [], ctx.emb.matrix(web_sha) if web_sha else None, ev_emb_sha, [],
               ctx.emb.matrix(ev_emb_sha), c.phash_threshold, c.decontam_threshold) \
        if ev_emb_sha else [None] * len(ids)
    dropped: Counter = Counter()
    for k, i in enumerate(ids):
        m = m1[k] or m2[k]
        if m:
            rows[i].drop(DropReason.CONTAMINATED, f"{m[0]} match of evaluation image {m[1][:16]}", None)
            dropped["contaminated"] += 1
    return Counts(dropped, {"eval_images": len(ev_ok)})
