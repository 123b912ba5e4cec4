"""What every image-embedding backend of curate offers (open_clip in ``pipeline.curate.embed``, the
teacher in ``distill.embedder``), and the device helpers they share.

``preprocess(pil) -> tensor`` (one image), ``prepare(pil)`` (runs in the decode threads) and
``collate(prepared) -> batch`` (the model's side: ``collate([prepare(im) ...])`` equals the stacked
``preprocess`` outputs), ``embed(batch) -> (emb, extra)`` (L2-normalised float32 [B, D], + class
probabilities for a classifier backend), ``key`` (cache key: model + weights), ``dim``, ``trained``
(weights known to be trained), ``has_text`` (text tower), ``input_side`` (the shorter side ``preprocess``
resizes to; None: unknown, images are decoded in full).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import ConfigError


class Embedder:
    """An embedding backend is a plugin (``kd3.embedders``): its ``Settings`` (keys of the ``curate`` section),
    ``check(cfg)`` (before any work) and ``from_config(cfg.curate, classes, teacher)``."""

    Settings: Any = None
    backend = "clip"
    key: str
    dim: int
    model_name: str
    pretrained: Optional[str]
    trained: bool  # weights are known to be trained (relevance filtering allowed)
    has_text = False
    input_side: Optional[int] = None  # preprocess resizes to this: larger files are decoded at reduced scale

    _transform = None  # the model's torchvision preprocessing (a Compose), set by use_transform
    _batched: Optional["BatchedPreprocess"] = None

    @classmethod
    def check(cls, cfg) -> None:
        """Fail fast, naming the setting, when the backend cannot work with the run config ``cfg``."""

    @classmethod
    def from_config(cls, cfg, classes: list[str], teacher: Optional[Path]) -> "Embedder":
        """The backend for the ``curate`` section ``cfg``."""
        return cls(teacher, cfg.device, classes)

    def use_transform(self, compose) -> None:
        """The backend's preprocessing: ``preprocess`` runs it whole, ``prepare``/``collate`` split it."""
        self._transform = compose
        self._batched = BatchedPreprocess(compose)

    def preprocess(self, img):
        if self._transform is None:  # pragma: no cover - interface
            raise NotImplementedError
        return self._transform(img)

    def prepare(self, img):
        """Per image, in curate's decode threads (default: all of ``preprocess``)."""
        return self._batched.prepare(img) if self._batched is not None else self.preprocess(img)

    def collate(self, prepared: list):
        """``prepare`` outputs -> the model's input batch (default: stacked)."""
        if self._batched is not None:
            return self._batched.collate(prepared)
        import torch  # heavy: only once a model runs

        return torch.stack(prepared)

    def embed(self, batch) -> tuple[np.ndarray, Optional[np.ndarray]]:  # pragma: no cover
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "pretrained": self.pretrained,
                "dim": self.dim, "trained": self.trained, "key": self.key}


class BatchedPreprocess:
    """A torchvision ``Compose`` that ends in ``ToTensor`` (+ ``Normalize``), split in two: the PIL steps
    per image in the decode threads, returning uint8 pixels, and ToTensor + Normalize once per batch on
    the model's thread, with the same arithmetic (``collate`` equals the stacked per-image outputs bit for
    bit). A torch op per image in each decode thread would start an OpenMP team of its own that fights the
    model's for the cores (on a busy 2-core machine ToTensor + Normalize of one 224 px image took 47 ms of
    wall time there, 0.25 ms on one thread). A ``Compose`` of another shape runs whole per image."""

    def __init__(self, compose):
        import torchvision.transforms as T  # heavy: only once a model is built

        ts = list(getattr(compose, "transforms", []))
        k = next((i for i, t in enumerate(ts) if isinstance(t, T.ToTensor)), None)
        tail = ts[k + 1:] if k is not None else []
        self.whole = compose
        self.split = k is not None and len(tail) <= 1 and all(isinstance(t, T.Normalize) for t in tail)
        self.head = T.Compose(ts[:k]) if self.split else None
        self.norm = tail[0] if self.split and tail else None

    def prepare(self, img):
        if self.split:
            out = self.head(img)
            if getattr(out, "mode", None) == "RGB":
                return np.asarray(out)  # H x W x 3 uint8: no torch op in the decode thread
        return self.whole(img)

    def collate(self, prepared: list):
        import torch  # heavy: only once a model runs

        if prepared and all(isinstance(p, np.ndarray) for p in prepared):
            return self._finish(np.stack(prepared))
        return torch.stack([self._finish(np.stack([p]))[0] if isinstance(p, np.ndarray) else p for p in prepared])

    def _finish(self, pixels: np.ndarray):
        """[B, H, W, 3] uint8 -> what ToTensor then Normalize give, op for op."""
        import torch  # heavy: only once a model runs

        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
        if self.norm is not None:
            mean = torch.as_tensor(self.norm.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.as_tensor(self.norm.std, dtype=x.dtype).view(1, -1, 1, 1)
            x.sub_(mean).div_(std)
        return x


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
