"""Distillation methods: one registry, one interface (in the manner of mdistiller's Distiller).

A method is an ``nn.Module`` that owns the student and every trainable extra (projector, heads, Q);
the teacher is held outside its parameters (frozen, eval mode, never in a state dict or DDP).

- ``select(epoch, epochs, infer) -> (indices | None, log)``: per-epoch hook before training.
  ``infer(fn)`` runs ``fn(x)`` under no_grad over the whole pool (both nets in eval mode, batched,
  bf16 on GPU, sharded under DDP) and returns the outputs concatenated in pool order (float32, CPU).
  ``None`` means "train on all of the pool".
- ``forward(x) -> dict[name, tensor]``: the per-batch losses by name (``losses`` is an alias);
  the trainer minimises ``sum(loss_weights.get(name, 1) * value)``.
- ``predict(x)``: logits of the deployable student; ``export() -> (arch, arch_kwargs, module)``.
- ``extra_state()`` / ``load_extra_state(d)``: selection state carried across epochs (checkpointed).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from pipeline.errors import ConfigError

_METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, student: nn.Module, teacher: nn.Module, cfg, num_classes: int,
                  student_arch: str = "", student_kwargs: dict | None = None) -> "Method":
    from . import dfnd, kd, kd3  # noqa: F401  (registration)

    if name not in _METHODS:
        raise ConfigError(f"unknown distillation method {name!r}; choose one of {', '.join(list_methods())}")
    return _METHODS[name](student, teacher, cfg, num_classes, student_arch=student_arch,
                          student_kwargs=student_kwargs or {})


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

    def select(self, epoch: int, epochs: int, infer: Callable) -> tuple[torch.Tensor | None, dict]:
        return None, {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def export(self) -> tuple[str, dict, nn.Module]:
        return self.student_arch, dict(self.student_kwargs), self.student

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, d: dict) -> None:
        pass
