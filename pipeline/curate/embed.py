"""Image embeddings for curation: open_clip here, the teacher's pooled features as a plugin.

``make_embedder(cfg.curate, classes, teacher)`` returns an :class:`pipeline.core.embedding.Embedder` with
``preprocess(pil) -> tensor`` (runs in the decode threads), ``embed(batch) -> (emb, extra)``
(L2-normalised float32, + teacher class probabilities for the teacher backend), ``key`` (the
cache key: model + weights, so a cache is never reused across models) and, for CLIP,
``text_embeddings(prompts)`` for zero-shot relevance.

Model configs shipped in ``pipeline/curate/model_configs/*.json`` (e.g. ``kd3-tiny-clip``, random
weights, used by the tests and the offline demo) are registered with open_clip on import.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from pydantic import Field

from pipeline.core import plugins
from pipeline.core.config import EMBEDDERS
from pipeline.core.embedding import Embedder, autocast, normalise, resolve_device
from pipeline.core.errors import ConfigError, one_line
from pipeline.core.io import atomic_path, atomic_write_json
from pipeline.core.plugin_settings import Settings

log = logging.getLogger("kd3.curate")

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def register_model_configs() -> None:
    global _registered
    if _registered:
        return
    import open_clip  # heavy: loaded when a CLIP model is built

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


class ClipSettings(Settings):
    """The CLIP backend's settings (keys of the ``curate`` section; relevance and ``crawl.assign: clip`` read
    them too)."""

    clip_model: str = Field("ViT-B-32", description="open_clip model name")
    clip_pretrained: Optional[str] = Field("laion2b_s34b_b79k", description="open_clip pretrained tag")
    clip_weights: Optional[Path] = Field(None, description="local open_clip weights file (overrides the tag)")


class ClipEmbedder(Embedder):
    Settings = ClipSettings
    backend = "clip"
    has_text = True

    @classmethod
    def check(cls, cfg) -> None:
        w = cfg.curate.clip_weights
        if w is not None and not Path(w).is_file():
            raise ConfigError(f"curate.clip_weights {w} does not exist")

    @classmethod
    def from_config(cls, cfg, classes: list[str], teacher: Optional[Path]) -> "ClipEmbedder":
        return cls(cfg.clip_model, cfg.clip_pretrained, cfg.clip_weights, cfg.device)

    def __init__(self, model_name: str, pretrained: Optional[str], weights: Optional[Path], device: str):
        import open_clip  # heavy: loaded when a CLIP model is built
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
                log.info("curate: loading open_clip %s (%s)%s", model_name, pretrained or wp.name,
                         "" if weights is not None else "; weights not in the cache are downloaded first")
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=source)
        except ConfigError:
            raise
        except Exception as e:
            first = one_line(e, 160)
            if weights is not None:
                raise ConfigError(f"curate.clip_weights {weights}: cannot load into {model_name} ({first})") from None
            raise ConfigError(
                f"open_clip {model_name} pretrained={pretrained!r} is not available offline or in the cache "
                f"({first}); set curate.clip_weights to a local weights file or use "
                f"curate.embed_backend: teacher") from None
        model.eval().to(self.device)
        self.model = model
        self.use_transform(preprocess)
        self.input_side = max(self._input_shape()[1:])
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

    def embed(self, batch):
        import torch  # heavy: a model exists, so torch is loaded already

        with torch.inference_mode(), autocast(self.device):
            f = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return normalise(f), None

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        import torch  # heavy: a model exists, so torch is loaded already

        with torch.inference_mode(), autocast(self.device):
            t = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return normalise(t)

    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().float().exp()) if ls is not None else 100.0


def make_embedder(cfg, classes: list[str], teacher: Optional[Path]) -> Embedder:
    """``cfg`` is the ``curate`` config section. Every backend is a plugin found by name (entry points
    ``kd3.embedders``: ``clip`` is :class:`ClipEmbedder`, ``teacher`` ``distill.embedder.TeacherEmbedder``);
    one without ``from_config`` is called as ``factory(teacher, device, classes)``."""
    factory = plugins.implementation(EMBEDDERS, cfg.embed_backend, "curate.embed_backend")
    if hasattr(factory, "from_config"):
        return factory.from_config(cfg, classes, teacher)
    return factory(teacher, cfg.device, classes)


class EmbeddingCache:
    """Embeddings per image sha256 under ``curate/cache/emb-<model key hash>/part-*.npz``.

    Written in parts (atomically, one per flush) so a crash loses at most one part; read back
    into a dict sha -> row. Keyed by the embedding model, so changing thresholds reuses it and
    changing the model does not.
    """

    def __init__(self, root: Path, key: str, part_prefix: str = "part-"):
        """``part_prefix``: the default reads every part and numbers new ones; a chunk of the scan passes
        ``part-<chunk id>-`` and then reads and writes its own parts only (:func:`.scan.scan_chunk`)."""
        self.dir = Path(root) / ("emb-" + hashlib.sha256(key.encode()).hexdigest()[:16])
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").exists():
            atomic_write_json(self.dir / "key.json", {"key": key})
        self.prefix = part_prefix
        self.ids: list[str] = []           # row -> sha, in the order rows were absorbed
        self.index: dict[str, int] = {}    # sha -> row
        # the rows as blocks (one per part: its rows not seen before), not one array per row: a row's own
        # ndarray costs ~110 B beside its data, and a dict per image for the extra outputs ~100 B more
        self._starts: list[int] = []       # first row of each block
        self._emb: list[np.ndarray] = []
        self._extra: list[Optional[np.ndarray]] = []
        self._loaded: set[str] = set()
        self.refresh()

    def _parts(self):
        return sorted(self.dir.glob(self.prefix + "*.npz"))

    def refresh(self) -> None:
        """Read the parts not read yet (those the scan's chunks wrote since)."""
        for p in self._parts():
            if p.name in self._loaded:
                continue
            self._loaded.add(p.name)
            try:
                z = np.load(p, allow_pickle=False)
                ids = [sys.intern(str(x)) for x in z["ids"]]  # one string per sha across curate's tables
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

    def _where(self, sha: str) -> tuple[int, int]:
        row = self.index[sha]
        b = bisect.bisect_right(self._starts, row) - 1
        return b, row - self._starts[b]

    def get(self, sha: str) -> np.ndarray:
        b, i = self._where(sha)
        return self._emb[b][i]

    def extra_of(self, sha: str) -> Optional[np.ndarray]:
        """The embedder's extra output for ``sha`` (the teacher's class probabilities), None without one."""
        if sha not in self.index:
            return None
        b, i = self._where(sha)
        x = self._extra[b]
        return None if x is None else x[i]

    def add_part(self, ids: list[str], emb: np.ndarray, extra: Optional[np.ndarray]) -> None:
        if not ids:
            return
        n = len(self._parts())
        path = self.dir / f"{self.prefix}{n:06d}.npz"
        while path.exists():
            n += 1
            path = self.dir / f"{self.prefix}{n:06d}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                if extra is not None:
                    np.savez(fh, ids=np.array(ids), emb=emb.astype(np.float32), extra=extra.astype(np.float32))
                else:
                    np.savez(fh, ids=np.array(ids), emb=emb.astype(np.float32))
        self._loaded.add(path.name)
        self._absorb(ids, emb, extra)

    def _absorb(self, ids: list[str], emb: np.ndarray, extra: Optional[np.ndarray]) -> None:
        keep = []  # the part's rows not absorbed before (the first of each sha wins)
        for i, sid in enumerate(ids):
            if sid not in self.index:
                self.index[sid] = len(self.ids)
                self.ids.append(sid)
                keep.append(i)
        if not keep:
            return
        sel = slice(None) if len(keep) == len(ids) else keep
        self._starts.append(len(self.ids) - len(keep))
        self._emb.append(np.asarray(emb)[sel])
        self._extra.append(None if extra is None else np.asarray(extra)[sel])

    def matrix(self, shas: list[str]) -> np.ndarray:
        """The embeddings of ``shas``, in that order, as one float32 matrix."""
        if not shas:
            return np.zeros((0, 0), np.float32)
        rows = np.fromiter((self.index[s] for s in shas), np.int64, count=len(shas))
        block = np.searchsorted(np.asarray(self._starts), rows, side="right") - 1
        out = np.empty((len(rows), self._emb[0].shape[1]), np.float32)
        order = np.argsort(block, kind="stable")
        for grp in np.split(order, np.flatnonzero(np.diff(block[order])) + 1):
            b = int(block[grp[0]])
            out[grp] = self._emb[b][rows[grp] - self._starts[b]]
        return out
