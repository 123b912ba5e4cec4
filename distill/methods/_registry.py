"""The method registry (kept out of the package ``__init__``, as timm keeps ``_registry.py``, so the
method modules import it without importing their own package back).

Methods are found by name through the ``kd3.methods`` entry points (the config validates each method's
section there when it loads, without importing torch: a built-in's entry point names its settings class,
:mod:`.settings`, which names the method's code); loading one imports its module, whose ``@register_method``
names it.
"""
from __future__ import annotations

import torch.nn as nn

from pipeline.core import plugins

from .base import Method

METHODS = plugins.Registry("kd3.methods", "distillation method")
register_method = METHODS.register


def create_method(name: str, student: nn.Module, teacher: nn.Module, cfg, num_classes: int,
                  student_arch: str = "", student_kwargs: dict | None = None) -> Method:
    """``cfg``: the method's own settings (``RunConfig.distill.method_config()``). Built-ins are registered
    when their module loads; a method of another package is its ``kd3.methods`` entry point."""
    cls = METHODS.get(name)
    return cls(student, teacher, cfg, num_classes, student_arch=student_arch, student_kwargs=student_kwargs or {})
