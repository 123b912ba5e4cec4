"""Helpers shared by every test area (``tests/`` is on ``sys.path`` through its conftest.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load_module(path: str | Path, name: str):
    """Import a helper module of another test area by its file (``tests/flows/conftest.py`` ...) under
    ``name``, once per session; its folder goes on ``sys.path`` so its own sibling imports work."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(path)
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Crash(Exception):
    """A crash injected into a run (``on_epoch_end=crash_after_first``), to test its resume."""


def crash_after_first(epoch: int) -> None:
    """Crash a distill run once its first epoch (and its checkpoint) is done."""
    if epoch == 0:
        raise Crash()
