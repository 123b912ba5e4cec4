"""Load a teacher (or a kd3 student) from the checkpoint contract or a TorchScript file."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.checkpoint import check_classes, is_torchscript, load_checkpoint, read_checkpoint_meta
from pipeline.core.errors import DataError

from .models import create_model

log = logging.getLogger("kd3.distill")


class ScriptedTeacher(nn.Module):
    """Uniform interface over a TorchScript module.

    The scripted module must expose ``forward_features`` (feature map) and a ``classifier`` Linear
    (every kd3 export does). A plain scripted classifier with only ``forward`` still works for
    logit-only methods (kd, dfnd); kd3 needs the feature map and the classifier and says so.
    """

    def __init__(self, m: torch.jit.ScriptModule, path: str):
        super().__init__()
        self.m = m
        self.path = path
        self.has_features = hasattr(m, "forward_features") and hasattr(m, "classifier")
        self._cls: nn.Linear | None = None
        if self.has_features:
            w = m.classifier.weight.detach()
            b = m.classifier.bias.detach() if getattr(m.classifier, "bias", None) is not None else None
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            self._cls = lin
            self.feature_dim = int(w.shape[1])

    @property
    def classifier(self) -> nn.Linear:
        if self._cls is None:
            raise DataError(f"{self.path}: TorchScript teacher exposes no forward_features/classifier "
                            f"(needed by kd3; kd and dfnd work with logits only)")
        return self._cls

    def forward_features(self, x):
        if not self.has_features:
            self.classifier  # raises the explanatory error
        return self.m.forward_features(x)

    def pool(self, f):
        return F.adaptive_avg_pool2d(f, 1).flatten(1)

    def forward(self, x):
        return self.m(x)


def build_from_checkpoint(ck: dict, where: str) -> nn.Module:
    model = create_model(ck["arch"], len(ck["classes"]), **ck["arch_kwargs"])
    sd = ck["state_dict"]
    own = model.state_dict()
    if not set(sd) & set(own) and hasattr(model, "net"):  # raw timm/torchvision state dict
        sd = {"net." + k: v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:1]
        raise DataError(f"{where}: weights do not fit architecture {ck['arch']!r} ({'; '.join(first) or e})") from None
    if missing or unexpected:
        raise DataError(f"{where}: weights do not fit architecture {ck['arch']!r} "
                        f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return model


def load_teacher(path, device: str | torch.device = "cpu", classes: list[str] | None = None,
                 classes_from: str = "the manifest"):
    """Return ``(model, meta)``; the model is in eval mode with gradients off.

    ``classes``: when given (the manifest's list), the checkpoint's classes must match exactly.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"teacher checkpoint {p} does not exist")
    if is_torchscript(p):
        meta = read_checkpoint_meta(p)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                m = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise DataError(f"{p}: cannot load TorchScript ({type(e).__name__}: {e})") from None
        model: nn.Module = ScriptedTeacher(m, str(p))
    else:
        ck = load_checkpoint(p)
        meta = {k: v for k, v in ck.items() if k != "state_dict"}
        model = build_from_checkpoint(ck, str(p))
    if classes is not None:
        check_classes(meta["classes"], classes, f"teacher {p.name}", classes_from)
    model.eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    return model, meta
