"""Plugins named in package metadata (entry points), so a name can be checked without importing it.

| group | an entry | who looks it up |
|---|---|---|
| ``kd3.methods`` | ``kd3 = "distill.methods.settings:Kd3Settings"`` | config (``distill.<method>`` sections), ``distill.methods.create_method`` |
| ``kd3.models`` | ``resnet18 = "distill.models:resnet18"`` | config (``distill.student`` check at load), ``distill.models.create_model`` |
| ``kd3.embedders`` | ``teacher = "distill.embedder:TeacherEmbedder"`` | ``pipeline.curate.embed.make_embedder`` |
| ``kd3.sources`` | ``folder = "crawlers.builtin:Folder"`` | config (``crawl.sources`` and the sources' settings), the crawl stage |
| ``kd3.commands`` | ``demo = "kd3demo.demo:register"`` | the ``kd3`` CLI (extra subcommands) |

Reading names touches metadata only (no import of torch or of the plugin), which keeps ``kd3 --help`` fast;
``load`` imports the one plugin asked for. A package adds a method, model, embedding backend, crawl source
or subcommand by declaring an entry point in its own ``pyproject.toml``.

**Settings.** A plugin owns its settings: a pydantic class, the plugin's ``Settings`` attribute, which the
config validates its section with when it resolves the plugin (:func:`settings`). An entry point names the
plugin (a class with ``Settings``), or the settings class itself where the plugin's code is heavy (kd3's own
methods: their code imports torch, found by ``distill.methods``' own registry), so a config loads without
importing torch. The kernel knows plugin *kinds* (the groups), never a plugin's fields.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Optional

from pydantic import BaseModel

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
    return _load(group, name)


@lru_cache(maxsize=None)
def _load(group: str, name: str) -> Any:
    return _group(group)[name].load()


def is_settings(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def settings(group: str, name: str) -> Optional[type[BaseModel]]:
    """The settings class of plugin ``name`` of ``group`` (None: it has none)."""
    obj = load(group, name)
    return obj if is_settings(obj) else getattr(obj, "Settings", None)


def implementation(group: str, name: str, what: str = "plugin") -> Any:
    """The plugin's code: what its entry point names, or, where that is its settings class, the object the
    settings name in ``implementation`` (``"module:attr"``)."""
    obj = load(group, name, what)
    if is_settings(obj):
        ref = getattr(obj, "implementation", None)
        if ref is None:
            raise ConfigError(f"{what} {name!r}: its entry point names settings without an implementation")
        obj = EntryPoint(name, ref, group).load()
    return obj


class Registry:
    """One plugin kind's names: the built-ins a package registers with ``@register(name)``, then the entry
    points of ``group`` (loaded on first use and remembered). Methods, models and crawl sources resolve
    their names through one of these each."""

    def __init__(self, group: str, what: str):
        self.group, self.what = group, what
        self.builtin: dict[str, Any] = {}
        self.loaded: set[str] = set()  # names taken from entry points (forgotten by ``clear``)
        _REGISTRIES.append(self)

    def register(self, name: str):
        def deco(obj):
            obj.name = name
            self.builtin[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(set(self.builtin) | set(names(self.group)))

    def get(self, name: str) -> Any:
        if name not in self.builtin:
            self.register(name)(implementation(self.group, name, self.what))
            self.loaded.add(name)
        return self.builtin[name]


_REGISTRIES: list[Registry] = []


def clear() -> None:
    """Forget what was read (a test that installs a package on ``sys.path`` calls this)."""
    _group.cache_clear()
    _load.cache_clear()
    for reg in _REGISTRIES:
        for name in reg.loaded:
            reg.builtin.pop(name, None)
        reg.loaded.clear()
