"""Hinton KD on all web images (docs/METHOD.md, the baselines)."""
from __future__ import annotations

import torch

from ._registry import register_method
from .base import Method
from .losses import kd_loss
from .settings import KdSettings


@register_method("kd")
class KD(Method):
    Settings = KdSettings

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z_t = self.teacher_logits(x)
        return {"kd": kd_loss(self.student(x), z_t, self.cfg.temperature)}
