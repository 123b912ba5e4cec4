"""The built-in crawl sources: search engines (through icrawler's feeders and parsers, :mod:`.sources`), URL
lists and local folders, each with its settings (keys of the ``crawl`` section). Light to import: the
engines' code loads when a crawl asks an engine."""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pipeline.core.config import RunConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.folder import class_files, class_folder, iter_class_files
from pipeline.core.plugin_settings import Settings

from .source import Candidate, Source, register_source


# ---------------------------------------------------------------- search engines

class EngineUrls(BaseModel):
    """Base URL of each search engine. Point them at a mirror, a proxy or the local fake web."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    bing: str = Field("https://www.bing.com", description="Bing base URL")
    baidu: str = Field("https://image.baidu.com", description="Baidu image search base URL")
    google: str = Field("https://www.google.com", description="Google base URL")
    flickr: str = Field("https://api.flickr.com", description="Flickr REST API base URL")


class EngineSettings(Settings):
    """The search engines' settings (shared by bing, baidu, google and flickr)."""

    max_results_per_query: int = Field(1000, gt=0, description="results to ask an engine for, per query")
    engine_urls: EngineUrls = Field(default_factory=EngineUrls)
    flickr_api_key: Optional[SecretStr] = Field(None, description="Flickr API key (or env FLICKR_API_KEY)")

    def flickr_key(self) -> str | None:
        if self.flickr_api_key is not None:
            return self.flickr_api_key.get_secret_value()
        return os.environ.get("FLICKR_API_KEY") or None


class Engine(Source):
    """A search engine: every query of ``query_templates x (class + synonyms)`` in turn."""

    Settings = EngineSettings
    answers_queries = True

    def candidates(self, cls: str, cfg: RunConfig) -> Iterator[Candidate]:
        from .sources import EngineError, expand_queries

        for q in expand_queries(cfg.crawl, cls):
            try:
                yield from self.query(q, cls, cfg)
            except EngineError:
                break
            if self.ctx.past_deadline():
                return

    def query(self, q: str, cls: str, cfg: RunConfig) -> Iterator[Candidate]:
        """One query's results; a failing engine says so in the class's notes (EngineError re-raised when
        the engine should be skipped for the class)."""
        from .sources import EngineError, engine_results

        try:
            for urls in engine_results(self.name, cfg.crawl, q, self.ctx.fetcher):
                for u in urls:
                    yield Candidate(u, q, self.name)
        except EngineError as e:
            self.ctx.note(cls, str(e))
            if e.give_up:
                raise


@register_source("bing")
class Bing(Engine):
    pass


@register_source("baidu")
class Baidu(Engine):
    pass


@register_source("google")
class Google(Engine):
    pass


@register_source("flickr")
class Flickr(Engine):
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cfg.crawl.flickr_key():
            raise ConfigError("source 'flickr' needs an API key: set crawl.flickr_api_key or env FLICKR_API_KEY")


# ---------------------------------------------------------------- URL lists

class UrlListSettings(Settings):
    url_list: Optional[Path] = Field(None, description="URL list file (.txt/.csv/.parquet) for source 'urls'")
    url_column: str = Field("url", description="URL column of a csv/parquet URL list")
    class_column: str = Field("class", description="class column of a csv/parquet URL list")


@register_source("urls")
class UrlList(Source):
    """The URLs a list file gives each class (txt: ``url`` or ``url<TAB>class``; csv/parquet: columns)."""

    Settings = UrlListSettings

    def __init__(self, ctx):
        super().__init__(ctx)
        self._lists: dict[str, list[str]] | None = None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.crawl.url_list is None:
            raise ConfigError("source 'urls' needs crawl.url_list (a .txt/.csv/.parquet file)")
        if not Path(cfg.crawl.url_list).is_file():
            raise ConfigError(f"crawl.url_list {cfg.crawl.url_list} does not exist")

    @classmethod
    def inputs(cls, cfg: RunConfig) -> dict[str, Optional[Path]]:
        return {"url_list": cfg.crawl.url_list}

    def candidates(self, cls: str, cfg: RunConfig) -> Iterator[Candidate]:
        from .sources import load_url_list

        c = cfg.crawl
        if self._lists is None:
            self._lists = load_url_list(Path(c.url_list), self.ctx.classes or [cls], c.url_column, c.class_column)
        for u in self._lists.get(cls, []):
            yield Candidate(u, "", self.name)


# ---------------------------------------------------------------- local folders

class FolderSettings(Settings):
    folder: Optional[Path] = Field(None, description="local image tree <root>/<class>/* for source 'folder'")


@register_source("folder")
class Folder(Source):
    """Every file of ``<crawl.folder>/<class>/`` (the one reader of such a tree: pipeline/core/folder.py)."""

    Settings = FolderSettings
    takes_whole = True

    @classmethod
    def check(cls, cfg: RunConfig, classes: Optional[list[str]] = None) -> None:
        """``crawl.folder`` is set, is a folder and, when it is the only source, holds files for some class."""
        if cfg.crawl.folder is None:
            raise ConfigError("source 'folder' needs crawl.folder (a folder <root>/<class>/*)")
        folder = Path(cfg.crawl.folder)
        if not folder.is_dir():
            raise ConfigError(f"crawl.folder {folder} is not a folder")
        if cfg.crawl.sources != [cls.name]:
            return
        names = classes if classes is not None else cfg.resolved_classes()
        folders = [d for d in (class_folder(folder, c) for c in names) if d is not None]
        if not any(next(iter_class_files(d), None) for d in folders):
            subs = sorted(d.name for d in folder.iterdir() if d.is_dir())[:5]
            raise DataError(f"crawl.folder {folder} holds no files for any class (expected <root>/<class>/*; "
                            f"sub-folders {subs or 'none'}, classes {names[:5]}{' ...' if len(names) > 5 else ''})")

    @classmethod
    def inputs(cls, cfg: RunConfig) -> dict[str, Optional[Path]]:
        return {"folder": cfg.crawl.folder}

    @classmethod
    def where(cls, cfg: RunConfig) -> str:
        return f"crawl.folder {cfg.crawl.folder}"

    def candidates(self, cls: str, cfg: RunConfig) -> Iterator[Candidate]:
        d, files = class_files(Path(cfg.crawl.folder), cls)
        if d is None:
            self.ctx.note(cls, f"folder: no sub-folder for class {cls!r} under {cfg.crawl.folder}")
        for f in files:
            yield Candidate(f.resolve().as_uri(), "", self.name, local=f)
