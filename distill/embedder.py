"""The teacher as curate's image encoder (``curate.embed_backend: teacher``): embeddings are its pooled
features, ``extra`` its class probabilities. Registered as the ``teacher`` plugin of ``kd3.embedders``,
so the curate stage finds it by name and never imports the distill package; light to import (torch loads
when it is built), as the config reads every embedder's settings."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.core.embedding import Embedder, autocast, normalise, resolve_device
from pipeline.core.errors import ConfigError
from pipeline.core.preflight import check_teacher


def load_teacher(path: str, device: str):
    from .teacher import load_teacher as load  # heavy: torch

    return load(path, device)


class TeacherEmbedder(Embedder):
    """Embeddings = the teacher's pooled features; ``extra`` = teacher class probabilities."""

    backend = "teacher"

    @classmethod
    def check(cls, cfg) -> None:
        check_teacher(cfg, "curate.embed_backend teacher")

    def __init__(self, teacher_path: Optional[Path], device: str, classes: list[str]):
        import torch  # heavy: here, not at import, so the config reads this plugin without torch
        import torchvision.transforms as T

        if teacher_path is None:
            raise ConfigError("curate.embed_backend is 'teacher' but no `teacher` checkpoint is set")
        tp = Path(teacher_path)
        if not tp.is_file():
            raise ConfigError(f"teacher checkpoint {tp} does not exist")
        self.device = resolve_device(device)
        model, meta = load_teacher(str(tp), self.device)
        model.eval()
        self.model = model
        self.meta = meta
        size = self.input_side = int(meta.get("input_size", 32))
        self.use_transform(T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                                      T.Normalize(meta.get("mean", [0.5] * 3), meta.get("std", [0.5] * 3))]))
        st = tp.stat()
        self.model_name = tp.name
        self.pretrained = str(tp.resolve())
        self.key = f"teacher:{tp.name}:{st.st_size}:{int(st.st_mtime)}"
        self.trained = True
        tclasses = list(meta.get("classes") or [])
        self.class_map = [tclasses.index(c) if c in tclasses else None for c in classes]
        with torch.inference_mode():
            f = model.pool(model.forward_features(torch.zeros(1, 3, size, size, device=self.device)))
        self.dim = int(f.shape[-1])

    def embed(self, batch):
        import torch  # loaded already: a model exists

        with torch.inference_mode(), autocast(self.device):
            h = self.model.pool(self.model.forward_features(batch.to(self.device, non_blocking=True)))
            clf = getattr(self.model, "classifier", None)
            probs = torch.softmax(clf(h).float(), dim=-1) if clf is not None else None
        return normalise(h), (probs.cpu().numpy().astype(np.float32) if probs is not None else None)
