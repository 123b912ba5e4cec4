"""The crawl source interface and registry: a source gives each class its candidate images.

A source is a class with

- ``Settings``: its pydantic settings; their fields are keys of the ``crawl`` section (``crawl.folder`` is
  :class:`crawlers.builtin.Folder`'s), validated when the config loads (pipeline/core/plugin_settings.py);
- ``candidates(cls, cfg)``: the candidates of one class, in the order they should be tried;
- ``check(cfg)``: what can be checked before any work (a missing file, a key not set), one line naming the setting;
- ``inputs(cfg)``: the local files or folders it reads (the flows' cache keys fingerprint them);
- ``takes_whole``: a local collection, taken whole unless ``crawl.per_class`` caps it;
  ``answers_queries``: a search engine (the crawl-selection loop plans queries for those).

Sources are found by name like every plugin kind: the built-ins (search engines through icrawler, URL lists,
local folders: :mod:`crawlers.builtin`) register here, any other is a ``kd3.sources`` entry point; the
names the config accepts are the entry points' (:func:`source_names`), one list for every check.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

from pipeline.core import plugins
from pipeline.core.config import SOURCES, RunConfig

if TYPE_CHECKING:
    from .fetch import Fetcher

log = logging.getLogger("kd3.crawl")


@dataclass
class Candidate:
    url: str
    query: str
    engine: str
    local: Path | None = None


@dataclass
class CrawlContext:
    """What a source may use while it lists candidates: the crawl's fetcher (rate limit, deadline), the run's
    classes and the per-class notes the summary shows."""

    fetcher: Optional["Fetcher"] = None
    classes: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    reject: Callable[[str, str, str, str], None] = lambda url, engine, error, detail: None
    """Record a candidate no class could be given (url, source, reason, detail): a pool's unreadable sample."""

    def note(self, cls: str, msg: str) -> None:
        self.notes[cls].append(msg)
        log.warning("class %r: %s", cls, msg)

    def past_deadline(self) -> bool:
        return self.fetcher is not None and self.fetcher.past_deadline()


class Source:
    name: ClassVar[str] = ""
    Settings: ClassVar[Any] = None
    takes_whole: ClassVar[bool] = False
    answers_queries: ClassVar[bool] = False

    def __init__(self, ctx: CrawlContext):
        self.ctx = ctx

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Fail fast, naming the setting, when the source cannot work with this config."""

    @classmethod
    def inputs(cls, cfg: RunConfig) -> dict[str, Optional[Path]]:
        return {}

    @classmethod
    def where(cls, cfg: RunConfig) -> str:
        """The source as a message names it."""
        return f"source {cls.name!r}"

    def candidates(self, cls: str, cfg: RunConfig) -> Iterator[Candidate]:  # pragma: no cover - interface
        raise NotImplementedError


SOURCE_REGISTRY = plugins.Registry(SOURCES, "crawl source")
register_source = SOURCE_REGISTRY.register


def source_names() -> list[str]:
    """Every source the config accepts (the ``kd3.sources`` entry points)."""
    return plugins.names(SOURCES)


def source_class(name: str) -> type[Source]:
    """The built-in source ``name`` or the ``kd3.sources`` entry point's."""
    return SOURCE_REGISTRY.get(name)


def query_sources() -> list[str]:
    """The sources that answer queries (search engines), the ones the crawl-selection loop plans for."""
    return [n for n in source_names() if source_class(n).answers_queries]


def sources_of(cfg: RunConfig) -> list[type[Source]]:
    """The configured sources, in ``crawl.sources`` order."""
    return [source_class(s) for s in cfg.crawl.sources]


def source_inputs(cfg: RunConfig) -> dict[str, Optional[Path]]:
    """The local inputs of the configured sources (what a crawl's result depends on besides its config)."""
    out: dict[str, Optional[Path]] = {}
    for src in sources_of(cfg):
        out.update(src.inputs(cfg))
    return out
