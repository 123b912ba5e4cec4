"""The distillation method interface (in the manner of mdistiller's Distiller); the registry is
:mod:`distill.methods._registry`.

A method is an ``nn.Module`` that owns the student and every trainable extra (projector, heads, Q);
the teacher is held outside its parameters (frozen, eval mode, never in a state dict or DDP).

- ``select(epoch, epochs, infer) -> Selection``: per-epoch hook before training.
  ``infer(fn)`` runs ``fn(x)`` under no_grad over the whole pool (both nets in eval mode, batched,
  bf16 on GPU, sharded under DDP) and returns the outputs concatenated in pool order (float32, CPU).
- ``forward(x) -> dict[name, tensor]``: the per-batch losses by name (``losses`` is an alias);
  ``total_loss(losses)`` is what the trainer minimises: ``sum(loss_weights.get(name, 1) * value)``.
- ``cfg`` is the method's own config section (``distill.kd3``, ``distill.kd``, ``distill.dfnd``).
- ``predict(x)``: logits of the deployable student; ``export() -> (arch, arch_kwargs, module)``.
- ``extra_state()`` / ``load_extra_state(d)``: selection state carried across epochs (checkpointed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

@dataclass
class Selection:
    """What a method's per-epoch selection hook decided.

    ``indices``: pool indices to train on this epoch (None = all of the pool); ``predictions``: a class per
    pool image that the per-class selected counts use (None = the query labels); ``log``: the method's
    own numbers for ``selection.jsonl`` (``alpha`` and ``thresholds`` have columns of their own); ``cycle``:
    the epoch keeps the step count of a pass over the whole pool (the shuffled selection repeated).
    """

    indices: Optional[torch.Tensor] = None
    predictions: Optional[torch.Tensor] = None
    log: dict = field(default_factory=dict)
    cycle: bool = False  # train as many steps as a pass over the whole pool, cycling the selection


class Method(nn.Module):
    name = "base"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg, num_classes: int,
                 student_arch: str = "", student_kwargs: dict | None = None):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list keeps it out of parameters(), state_dict() and DDP
        self.cfg = cfg
        self.num_classes = num_classes
        self.student_arch = student_arch
        self.student_kwargs = dict(student_kwargs or {})
        self.loss_weights: dict[str, float] = {}

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def select(self, epoch: int, epochs: int, infer: Callable) -> Selection:
        return Selection()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar the trainer minimises: the losses weighted by ``loss_weights`` (default 1)."""
        return sum(self.loss_weights.get(k, 1.0) * v.float() for k, v in losses.items())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def export(self) -> tuple[str, dict, nn.Module]:
        return self.student_arch, dict(self.student_kwargs), self.student

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, d: dict) -> None:
        pass
