"""Distillation methods behind one interface (:mod:`.base`), found by name (:mod:`._registry`):
``kd3`` (:mod:`.kd3`), ``kd`` (:mod:`.kd`), ``dfnd`` (:mod:`.dfnd`); their losses in :mod:`.losses`."""
from ._registry import create_method, list_methods, register_method
from .base import Method, Selection

__all__ = ["Method", "Selection", "create_method", "list_methods", "register_method"]
