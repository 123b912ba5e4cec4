"""Step 3 of curation: image embeddings (open_clip or the teacher's pooled features).

``make_embedder(cfg.curate, classes, teacher)`` returns an :class:`Embedder` with
``preprocess(pil) -> tensor`` (runs in the decode threads), ``embed(batch) -> (emb, extra)``
(L2-normalised float32, + teacher class probabilities for the teacher backend), ``key`` (the
cache key: model + weights, so a cache is never reused across models) and, for CLIP,
``text_embeddings(prompts)`` for zero-shot relevance.

Model configs shipped in ``pipeline/model_configs/*.json`` (e.g. ``kd3-tiny-clip``, random
weights, used by the tests and the offline demo) are registered with open_clip on import.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def register_model_configs() -> None:
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"curate.device {device!r}: CUDA is not available on this machine")
    return device


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


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _normalise(x) -> np.ndarray:
    import torch

    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32)


class ClipEmbedder(Embedder):
    backend = "clip"
    has_text = True

    def __init__(self, model_name: str, pretrained: Optional[str], weights: Optional[Path], device: str):
        import open_clip
        import torch

        register_model_configs()
        self.device = resolve_device(device)
        self.model_name = model_name
        if model_name not in open_clip.list_models():
            raise ConfigError(f"curate.clip_model {model_name!r} is not an open_clip model config "
                              f"(e.g. ViT-B-32, or kd3-tiny-clip for tests)")
        if weights is not None:
            wp = Path(weights)
            if not wp.is_file():
                raise ConfigError(f"curate.clip_weights {wp} does not exist")
            source = str(wp.resolve())
            st = wp.stat()
            self.pretrained = source
            self.key = f"clip:{model_name}:file:{wp.name}:{st.st_size}:{int(st.st_mtime)}"
        elif pretrained:
            source = pretrained
            self.pretrained = pretrained
            self.key = f"clip:{model_name}:{pretrained}"
        else:
            source = None
            self.pretrained = None
            self.key = f"clip:{model_name}:random-seed0"
        try:
            if source is None:
                log.warning("curate: open_clip %s with RANDOM weights (no clip_pretrained/clip_weights): "
                            "embeddings only good for tests; relevance filtering is refused", model_name)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=source)
        except ConfigError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if weights is not None:
                raise ConfigError(f"curate.clip_weights {weights}: cannot load into {model_name} ({first})") from None
            raise ConfigError(
                f"open_clip {model_name} pretrained={pretrained!r} is not available offline or in the cache "
                f"({first}); set curate.clip_weights to a local weights file or use "
                f"curate.embed_backend: teacher") from None
        model.eval().to(self.device)
        self.model = model
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        with torch.no_grad():
            self.dim = int(model.encode_image(torch.zeros(1, *self._input_shape(), device=self.device)).shape[-1])
        ls = getattr(model, "logit_scale", None)
        untrained_scale = ls is not None and abs(float(ls.detach().float()) - CLIP_INIT_LOGIT_SCALE) < 1e-4
        self.trained = source is not None and not untrained_scale

    def _input_shape(self):
        size = self.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return (3, int(size[0]), int(size[1]))

    def preprocess(self, img):
        return self._preprocess(img)

    def embed(self, batch):
        import torch

        with torch.inference_mode(), _autocast(self.device):
            f = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return _normalise(f), None

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode(), _autocast(self.device):
            t = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return _normalise(t)

    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().float().exp()) if ls is not None else 100.0


class TeacherEmbedder(Embedder):
    """Embeddings = the teacher's pooled features; ``extra`` = teacher class probabilities."""

    backend = "teacher"

    def __init__(self, teacher_path: Optional[Path], device: str, classes: list[str]):
        if teacher_path is None:
            raise ConfigError("curate.embed_backend is 'teacher' but no `teacher` checkpoint is set")
        tp = Path(teacher_path)
        if not tp.is_file():
            raise ConfigError(f"teacher checkpoint {tp} does not exist")
        from distill.teacher import load_teacher  # lazy: pipeline must not import distill at module level

        import torchvision.transforms as T

        self.device = resolve_device(device)
        model, meta = load_teacher(str(tp), self.device)
        model.eval()
        self.model = model
        self.meta = meta
        size = int(meta.get("input_size", 32))
        self._preprocess = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                                      T.Normalize(meta.get("mean", [0.5] * 3), meta.get("std", [0.5] * 3))])
        st = tp.stat()
        self.model_name = tp.name
        self.pretrained = str(tp.resolve())
        self.key = f"teacher:{tp.name}:{st.st_size}:{int(st.st_mtime)}"
        self.trained = True
        tclasses = list(meta.get("classes") or [])
        self.class_map = [tclasses.index(c) if c in tclasses else None for c in classes]
        import torch

        with torch.inference_mode():
            f = model.pool(model.forward_features(torch.zeros(1, 3, size, size, device=self.device)))
        self.dim = int(f.shape[-1])

    def preprocess(self, img):
        return self._preprocess(img)

    def embed(self, batch):
        import torch

        with torch.inference_mode(), _autocast(self.device):
            h = self.model.pool(self.model.forward_features(batch.to(self.device, non_blocking=True)))
            clf = getattr(self.model, "classifier", None)
            probs = torch.softmax(clf(h).float(), dim=-1) if clf is not None else None
        return _normalise(h), (probs.cpu().numpy().astype(np.float32) if probs is not None else None)


def make_embedder(cfg, classes: list[str], teacher: Optional[Path]) -> Embedder:
    """``cfg`` is the ``curate`` config section."""
    if cfg.embed_backend == "teacher":
        return TeacherEmbedder(teacher, cfg.device, classes)
    return ClipEmbedder(cfg.clip_model, cfg.clip_pretrained, cfg.clip_weights, cfg.device)


class EmbeddingCache:
    """Embeddings per image sha256 under ``curate/cache/emb-<model key hash>/part-*.npz``.

    Written in parts (atomically, one per flush) so a crash loses at most one part; read back
    into a dict sha -> row. Keyed by the embedding model, so changing thresholds reuses it and
    changing the model does not.
    """

    def __init__(self, root: Path, key: str):
        import hashlib

        self.dir = Path(root) / ("emb-" + hashlib.sha256(key.encode()).hexdigest()[:16])
        self.dir.mkdir(parents=True, exist_ok=True)
        from .io import atomic_write_json

        if not (self.dir / "key.json").exists():
            atomic_write_json(self.dir / "key.json", {"key": key})
        self.ids: list[str] = []
        self.rows: list[np.ndarray] = []
        self.extra: dict[str, np.ndarray] = {}
        self.index: dict[str, int] = {}
        self._load()

    def _parts(self):
        return sorted(self.dir.glob("part-*.npz"))

    def _load(self) -> None:
        for p in self._parts():
            try:
                z = np.load(p, allow_pickle=False)
                ids = [str(x) for x in z["ids"]]
                emb = z["emb"]
                extra = z["extra"] if "extra" in z.files else None
            except Exception:
                log.warning("curate: ignoring unreadable embedding cache part %s", p)
                continue
            self._absorb(ids, emb, extra if extra is not None and extra.size else None)

    def __contains__(self, sha: str) -> bool:
        return sha in self.index

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, sha: str) -> np.ndarray:
        return self.rows[self.index[sha]]

    def add_part(self, ids: list[str], emb: np.ndarray, extra: Optional[np.ndarray]) -> None:
        from .io import atomic_path

        if not ids:
            return
        n = len(self._parts())
        path = self.dir / f"part-{n:06d}.npz"
        while path.exists():
            n += 1
            path = self.dir / f"part-{n:06d}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                if extra is not None:
                    np.savez(fh, ids=np.array(ids), emb=emb.astype(np.float32), extra=extra.astype(np.float32))
                else:
                    np.savez(fh, ids=np.array(ids), emb=emb.astype(np.float32))
        self._absorb(ids, emb, extra)

    def _absorb(self, ids: list[str], emb: np.ndarray, extra: Optional[np.ndarray]) -> None:
        for i, sid in enumerate(ids):
            if sid in self.index:
                continue
            self.index[sid] = len(self.ids)
            self.ids.append(sid)
            self.rows.append(emb[i])
            if extra is not None:
                self.extra[sid] = extra[i]

    def matrix(self, shas: list[str]) -> np.ndarray:
        if not shas:
            return np.zeros((0, 0), np.float32)
        return np.stack([self.rows[self.index[s]] for s in shas]).astype(np.float32)
