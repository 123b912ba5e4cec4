"""Config sections whose keys belong to plugins (:mod:`.plugins`): the kernel knows the kind, the plugin its fields.

Two layouts, one mechanism:

- :class:`PluginSections` — one sub-section per plugin, named after it: ``distill.kd3.tau`` is validated by
  the settings class of method ``kd3``. Every installed plugin with settings gets its section (defaults
  where the config gives none), so ``cfg.distill.kd3`` always exists.
- :class:`PluginFields` — the plugins' fields are keys of the section itself: ``crawl.folder`` is a field
  of source ``folder``'s settings, ``crawl.webdataset`` one of source ``webdataset``'s. Two plugins may share
  one settings class (the search engines do).

A key no plugin (and not the section itself) declares is an unknown key; a plugin's own validation errors
keep their full location (``distill.kd3.view_share: ...``), through :class:`PluginSettingsError`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Iterator, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from . import plugins


class Settings(BaseModel):
    """Base of a plugin's settings class: unknown keys are errors, assignments are validated. A plugin whose
    code is heavy names it in ``implementation`` (``"module:attr"``) and its entry point names this class."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    implementation: ClassVar[Optional[str]] = None


class PluginSettingsError(ValueError):
    """A plugin's settings refused their values: ``errors`` are (location inside the section, message)."""

    def __init__(self, errors: list[tuple[tuple, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors))


def error_message(err: dict) -> str:
    return "unknown key" if err["type"] == "extra_forbidden" else err["msg"]


def validate_settings(cls: type[BaseModel], data: Any, prefix: tuple = ()) -> BaseModel:
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate({} if data is None else data)
    except ValidationError as e:
        raise PluginSettingsError([(prefix + tuple(err["loc"]), error_message(err)) for err in e.errors()]) from None


class _PluginKeys(BaseModel):
    """Extra keys are allowed only as far as a plugin declares them (checked by the validators below)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    plugin_group: ClassVar[str] = ""

    @classmethod
    def plugin_settings(cls) -> dict[str, type[BaseModel]]:
        """Installed plugin -> its settings class (plugins without settings left out)."""
        out = {}
        for name in plugins.names(cls.plugin_group):
            s = plugins.settings(cls.plugin_group, name)
            if s is not None:
                out[name] = s
        return out

    @model_validator(mode="before")
    @classmethod
    def _plugin_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        known = cls.plugin_keys()
        bad = [k for k in data if k not in cls.model_fields and k not in known]
        if bad:
            raise PluginSettingsError([((k,), "unknown key") for k in bad])
        cls.validate_plugins(data)
        return data

    @classmethod
    def plugin_keys(cls) -> Iterable[str]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def validate_plugins(cls, data: dict) -> None:  # pragma: no cover - interface
        """Replace the plugins' keys of ``data`` by their validated values (defaults where missing)."""
        raise NotImplementedError


class PluginSections(_PluginKeys):
    @classmethod
    def plugin_keys(cls) -> Iterable[str]:
        return cls.plugin_settings()

    @classmethod
    def validate_plugins(cls, data: dict) -> None:
        for name, s in cls.plugin_settings().items():
            data[name] = validate_settings(s, data.get(name), (name,))

    @classmethod
    def plugin_fields(cls) -> Iterator[tuple[str, type[BaseModel]]]:
        """(key prefix, settings class) for the CLI flags: ``kd3.`` + Kd3's fields."""
        for name, s in cls.plugin_settings().items():
            yield f"{name}.", s


class PluginFields(_PluginKeys):
    @classmethod
    def plugin_keys(cls) -> Iterable[str]:
        return cls.field_owners()

    @classmethod
    def validate_plugins(cls, data: dict) -> None:
        owner = cls.field_owners()
        for s in dict.fromkeys(owner.values()):
            mine = [f for f, o in owner.items() if o is s]
            valid = validate_settings(s, {f: data[f] for f in mine if f in data})
            data.update({f: getattr(valid, f) for f in mine})

    @classmethod
    def field_owners(cls) -> dict[str, type[BaseModel]]:
        """Each plugin field -> the settings class that declares it (the first plugin's, by name)."""
        owner: dict[str, type[BaseModel]] = {}
        for s in cls.plugin_settings().values():
            for f in s.model_fields:
                owner.setdefault(f, s)
        return owner

    @classmethod
    def plugin_fields(cls) -> Iterator[tuple[str, type[BaseModel]]]:
        for s in dict.fromkeys(cls.field_owners().values()):
            yield "", s

    def settings_of(self, name: str) -> Optional[BaseModel]:
        """Plugin ``name``'s settings, read from this section's keys (None: it has none)."""
        s = plugins.settings(self.plugin_group, name)
        if s is None:
            return None
        extra = self.__pydantic_extra__ or {}
        return s.model_construct(**{f: extra[f] for f in s.model_fields if f in extra})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name.startswith("_"):
                raise
        for plugin, s in type(self).plugin_settings().items():  # a settings method: cfg.crawl.flickr_key()
            if callable(getattr(s, name, None)):
                return getattr(self.settings_of(plugin), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
