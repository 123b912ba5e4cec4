"""Decontamination (the ``decontaminate`` step, :mod:`.steps.decontaminate`): remove web images that duplicate evaluation images.

The evaluation folder (``curate.decontaminate``, any depth, e.g. an ImageFolder) is read once per
run: every decodable image gives a sha256, a pHash and an embedding (through the same cache as the
web images). A web image is ``contaminated`` if it is an exact copy, within the pHash threshold,
or above ``decontam_threshold`` cosine of any evaluation image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.io import sha256_file

from .hashing import any_within

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def eval_files(folder: Path) -> list[tuple[str, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"curate.decontaminate {folder} is not a folder")
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.append((sha256_file(p), p))
    return out


def match(web_sha: list[str], web_phash: list[str], web_emb: np.ndarray | None,
          ev_sha: list[str], ev_phash: list[str], ev_emb: np.ndarray | None,
          phash_threshold: int, cos_threshold: float) -> list[tuple[str, str] | None]:
    """Per web image: (how, eval sha) when it duplicates an eval image, else None."""
    out: list[tuple[str, str] | None] = [None] * len(web_sha)
    ev_set = {s: s for s in ev_sha}
    for i, s in enumerate(web_sha):
        if s in ev_set:
            out[i] = ("exact", s)
    ph = any_within(web_phash, ev_phash, phash_threshold)
    for i, j in enumerate(ph):
        if out[i] is None and j is not None:
            out[i] = ("phash", ev_sha[j])
    if web_emb is not None and ev_emb is not None and len(ev_emb) and len(web_emb):
        import faiss  # heavy: only when there are embeddings to compare

        index = faiss.IndexFlatIP(ev_emb.shape[1])
        index.add(np.ascontiguousarray(ev_emb, dtype=np.float32))
        sim, idx = index.search(np.ascontiguousarray(web_emb, dtype=np.float32), 1)
        for i in range(len(web_sha)):
            if out[i] is None and sim[i, 0] >= cos_threshold:
                out[i] = (f"embedding cos={sim[i, 0]:.3f}", ev_sha[int(idx[i, 0])])
    return out
