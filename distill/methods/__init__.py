"""Distillation methods behind one interface (:mod:`.base`), found by name (:mod:`._registry`):
``kd3`` (:mod:`.kd3`), ``kd`` (:mod:`.kd`), ``dfnd`` (:mod:`.dfnd`); their losses in :mod:`.losses`, their
settings in :mod:`.settings`.

The names below are imported on first use, so reading the settings (the config does, for every command)
does not import torch."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"create_method": "._registry", "register_method": "._registry",
          "Method": ".base", "Selection": ".base"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
