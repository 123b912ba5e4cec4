"""Plugins named in package metadata (entry points), so a name can be checked without importing it.

| group | an entry | who looks it up |
|---|---|---|
| ``kd3.methods`` | ``kd3 = "distill.methods.kd3:KD3"`` | config (name check at load), ``distill.methods.create_method`` |
| ``kd3.models`` | ``resnet18 = "distill.models:resnet18"`` | config (``distill.student`` check at load) |
| ``kd3.embedders`` | ``teacher = "distill.embedder:TeacherEmbedder"`` | ``pipeline.curate.embed.make_embedder`` |
| ``kd3.commands`` | ``demo = "kd3demo.demo:register"`` | the ``kd3`` CLI (extra subcommands) |

Reading names touches metadata only (no import of torch or of the plugin), which keeps config loading
and ``kd3 --help`` fast; ``load`` imports the one plugin asked for. A package adds a method, model,
embedding backend or subcommand by declaring an entry point in its own ``pyproject.toml``.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import ConfigError


@lru_cache(maxsize=None)
def _group(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    return sorted(_group(group))


def load(group: str, name: str, what: str = "plugin") -> Any:
    ep = _group(group).get(name)
    if ep is None:
        raise ConfigError(f"unknown {what} {name!r}; choose one of {', '.join(names(group)) or 'none installed'}")
    return ep.load()
