"""Class relevance (the ``relevance`` step, :mod:`.steps.relevance`) by CLIP zero-shot classification.

Each class gets the mean text embedding of its prompts (``curate.prompt_templates``); each
negative prompt ("text", "a logo", ...) is one extra label. Scores are the softmax over all labels
(CLIP's logit scale); ``clip_scores`` keep the per-class part for every image. The optional
off-class filter drops an image when the top label is not its query class and beats it by more
than ``relevance_margin``. With untrained (random) CLIP weights the scores mean nothing, so the
filter refuses to run.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.core.errors import ConfigError


def label_embeddings(embedder, classes: list[str], templates: list[str], negatives: list[str]) -> np.ndarray:
    out = []
    for c in classes:
        prompts = [t.replace("{c}", c) for t in templates]
        t = embedder.text_embeddings(prompts).mean(0)
        out.append(t / max(float(np.linalg.norm(t)), 1e-12))
    if negatives:
        out.extend(embedder.text_embeddings(list(negatives)))
    return np.stack(out).astype(np.float32)


def zero_shot(img_emb: np.ndarray, label_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over labels, [N, L]."""
    if len(img_emb) == 0:
        return np.zeros((0, len(label_emb)), np.float32)
    logits = logit_scale * (img_emb @ label_emb.T)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def check_filter_allowed(embedder, enabled: bool) -> None:
    if enabled and not embedder.trained:
        raise ConfigError(
            f"curate.relevance_filter needs trained CLIP weights, but {embedder.model_name} has random/untrained "
            f"weights (set curate.clip_pretrained or curate.clip_weights, or turn the filter off)")


def off_class(scores: np.ndarray, label: int, margin: float) -> tuple[bool, int]:
    """(drop?, top label) for one image's score row over all labels."""
    top = int(np.argmax(scores))
    return (top != label and float(scores[top] - scores[label]) > margin), top


def label_names(classes: list[str], negatives: Optional[list[str]]) -> list[str]:
    return list(classes) + [f"neg:{n}" for n in (negatives or [])]
