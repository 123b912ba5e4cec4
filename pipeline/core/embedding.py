"""What every image-embedding backend of curate offers (open_clip in ``pipeline.curate.embed``, the
teacher in ``distill.embedder``), and the device helpers they share.

``preprocess(pil) -> tensor`` (runs in the decode threads), ``embed(batch) -> (emb, extra)``
(L2-normalised float32 [B, D], + class probabilities for a classifier backend), ``key`` (cache key:
model + weights), ``dim``, ``trained`` (weights known to be trained), ``has_text`` (text tower).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np

from .errors import ConfigError


class Embedder:
    backend = "clip"
    key: str
    dim: int
    model_name: str
    pretrained: Optional[str]
    trained: bool  # weights are known to be trained (relevance filtering allowed)
    has_text = False

    def preprocess(self, img):  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, batch) -> tuple[np.ndarray, Optional[np.ndarray]]:  # pragma: no cover
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "pretrained": self.pretrained,
                "dim": self.dim, "trained": self.trained, "key": self.key}


def resolve_device(device: str) -> str:
    import torch  # heavy: only once a model is built

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"curate.device {device!r}: CUDA is not available on this machine")
    return device


def autocast(device: str):
    import torch  # heavy: only once a model runs

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def normalise(x) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32)
