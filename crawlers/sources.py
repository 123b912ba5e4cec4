"""Image sources: search engines through icrawler's own feeders and parsers, URL lists, local folders.

The engines keep icrawler 0.6.10's code paths: its ``Feeder`` subclasses build the result-page URLs
(with the base URL taken from ``crawl.engine_urls``) and its ``Parser.parse`` methods extract the
image URLs. Only the transport differs: kd3 fetches every result page and image itself
(:mod:`crawlers.fetch`: rate limit, private-address refusal, retries, deadline), so each URL gets a
record. The page URLs are built lazily and fetched one by one, so a class that reaches its target
stops asking the engine.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import queue
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator
from urllib.parse import quote, urlencode

from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
from icrawler.builtin.bing import BingFeeder, BingParser
from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
from icrawler.builtin.google import GoogleFeeder, GoogleParser
from icrawler.utils import Signal

from pipeline.core.errors import ConfigError
from pipeline.core.folder import match_class

from .fetch import FetchError, Fetcher, redact

log = logging.getLogger("kd3.crawl.sources")

ENGINE_CAP = {"bing": 1000, "baidu": 1000, "google": 1000, "flickr": 4000}
FLICKR_SIZES = ["original", "large 2048", "large 1600", "large", "medium 800", "medium 640", "medium",
                "small 320", "small", "thumbnail", "large square", "square"]
GOOGLE_ZERO = ("google: result page parsed to 0 image URLs — Google changes its markup often; "
               "try bing or baidu")


class EngineError(Exception):
    """An engine could not give results for a query. ``give_up``: skip the engine for this class."""

    def __init__(self, msg: str, give_up: bool = False):
        super().__init__(redact(msg))
        self.give_up = give_up


# ---- icrawler feeders with a configurable base URL (the rest is icrawler's own logic) ----

class KdBingFeeder(BingFeeder):
    base = "https://www.bing.com"

    def feed(self, keyword, offset, max_num, filters=None):
        base_url = self.base.rstrip("/") + "/images/async?q={}&first={}"
        self.filter = self.get_filter()
        filter_str = self.filter.apply(filters)
        filter_str = "&qft=" + filter_str if filter_str else ""
        for i in range(offset, offset + max_num, 20):
            self.out_queue.put(base_url.format(quote(keyword), i) + filter_str)


class KdBaiduFeeder(BaiduFeeder):
    base = "https://image.baidu.com"

    def feed(self, keyword, offset, max_num, filters=None):
        base_url = self.base.rstrip("/") + "/search/acjson?tn=resultjson_com&ipn=rj&word={}&pn={}&rn=30"
        self.filter = self.get_filter()
        filter_str = self.filter.apply(filters, sep="&")
        for i in range(offset, offset + max_num, 30):
            url = base_url.format(quote(keyword), i)
            if filter_str:
                url += "&" + filter_str
            self.out_queue.put(url)


class KdGoogleFeeder(GoogleFeeder):
    base = "https://www.google.com"

    def feed(self, keyword, offset, max_num, language=None, filters=None):
        base_url = self.base.rstrip("/") + "/search?"
        self.filter = self.get_filter()
        filter_str = self.filter.apply(filters, sep=",")
        for i in range(offset, offset + max_num, 100):
            params = dict(q=keyword, ijn=int(i / 100), start=i, tbs=filter_str, tbm="isch")
            if language:
                params["lr"] = "lang_" + language
            self.out_queue.put(base_url + urlencode(params))


class KdFlickrFeeder(FlickrFeeder):
    base = "https://api.flickr.com"

    def feed(self, apikey, max_num=4000, **kwargs):
        max_num = min(max_num, 4000)
        params = {"method": "flickr.photos.search", "api_key": apikey, "format": "json", "nojsoncallback": 1}
        params.update(kwargs)
        url = self.base.rstrip("/") + "/services/rest/?" + urlencode(params)
        per_page = int(params.get("per_page", 100))
        for i in range(1, int(math.ceil(max_num / per_page)) + 1):
            self.out_queue.put(f"{url}&page={i}")


class KdFlickrParser(FlickrParser):
    """icrawler's FlickrParser with the getSizes call sent to the configured base URL."""

    base = "https://api.flickr.com"

    def parse(self, response, apikey, size_preference=None):
        content = json.loads(response.content.decode("utf-8", "ignore"))
        if content.get("stat") != "ok":
            return
        for photo in content["photos"]["photo"]:
            params = {"method": "flickr.photos.getSizes", "api_key": apikey, "photo_id": photo["id"],
                      "format": "json", "nojsoncallback": 1}
            try:
                ret = self.session.get(self.base.rstrip("/") + "/services/rest/?" + urlencode(params))
                info = json.loads(ret.content.decode())
            except Exception:  # noqa: BLE001 - as icrawler: skip the photo
                continue
            if info.get("stat") != "ok":
                continue
            urls = {str(item["label"]).lower(): item["source"] for item in info["sizes"]["size"]}
            for sz in size_preference or FLICKR_SIZES:
                if sz in urls:
                    yield dict(file_url=urls[sz], meta=photo)
                    break


class _PageSession:
    """What an icrawler parser sees as ``self.session``: GETs go through kd3's fetcher."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher

    def get(self, url, **_kw):
        return SimpleNamespace(content=self.fetcher.fetch_page(url), url=url, status_code=200)


_FEEDERS = {"bing": (KdBingFeeder, BingParser), "baidu": (KdBaiduFeeder, BaiduParser),
            "google": (KdGoogleFeeder, GoogleParser), "flickr": (KdFlickrFeeder, KdFlickrParser)}


def engine_page_urls(engine: str, ccfg, query: str) -> list[str]:
    """The result-page URLs icrawler's feeder would fetch for ``query``."""
    feeder_cls, _ = _FEEDERS[engine]
    feeder = feeder_cls(1, Signal(), None)
    feeder.base = getattr(ccfg.engine_urls, engine)
    feeder.out_queue = queue.Queue()  # unbounded: the stock CachedQueue would block the feeder
    max_num = min(ccfg.max_results_per_query, ENGINE_CAP[engine])
    if engine == "flickr":
        feeder.feed(apikey=ccfg.flickr_key(), max_num=max_num, text=query, sort="relevance",
                    per_page=min(100, max_num), content_type=1, safe_search=1)
    else:
        feeder.feed(keyword=query, offset=0, max_num=max_num)
    out = []
    while not feeder.out_queue.empty():
        out.append(feeder.out_queue.get_nowait())
    return out


def engine_results(engine: str, ccfg, query: str, fetcher: Fetcher) -> Iterator[list[str]]:
    """Yield the image URLs of each result page, until a page brings nothing new."""
    _, parser_cls = _FEEDERS[engine]
    parser = parser_cls(1, Signal(), _PageSession(fetcher))
    if engine == "flickr":
        parser.base = ccfg.engine_urls.flickr
    seen: set[str] = set()
    for i, page_url in enumerate(engine_page_urls(engine, ccfg, query)):
        if fetcher.past_deadline():
            return
        try:
            content = fetcher.fetch_page(page_url)
        except FetchError as e:
            msg = f"{engine}: result page for {query!r} failed: {e.reason} {e.detail}".strip()
            if i == 0:
                raise EngineError(msg, give_up=e.reason in ("private_host", "dns", "bad_scheme", "bad_url"))
            log.warning("%s", redact(msg))
            return
        response = SimpleNamespace(content=content, url=page_url, status_code=200)
        if engine == "flickr":
            _check_flickr(content)
        try:
            if engine == "flickr":
                tasks = parser.parse(response, apikey=ccfg.flickr_key(), size_preference=FLICKR_SIZES)
            else:
                tasks = parser.parse(response)
            # icrawler parsers are generators: a malformed page raises while it is iterated
            urls = [t["file_url"] for t in (tasks or []) if isinstance(t, dict) and t.get("file_url")]
        except Exception as e:  # noqa: BLE001 - any parser failure on a malformed page
            msg = f"{engine}: result page for {query!r} is malformed ({type(e).__name__}: {e})"[:300]
            if i == 0:
                raise EngineError(redact(msg)) from None
            log.warning("%s", redact(msg))
            return
        new = [u for u in urls if u not in seen]
        seen.update(new)
        if i == 0 and not urls:
            if engine == "google":
                raise EngineError(GOOGLE_ZERO, give_up=True)
            raise EngineError(f"{engine}: result page for {query!r} parsed to 0 image URLs")
        if not new:
            return
        yield new


def _check_flickr(content: bytes) -> None:
    try:
        doc = json.loads(content.decode("utf-8", "ignore"))
    except ValueError:
        raise EngineError("flickr: the API answered something that is not JSON", give_up=True) from None
    if doc.get("stat") != "ok":
        raise EngineError(f"flickr: API error {doc.get('code')}: {doc.get('message')} "
                          "(check crawl.flickr_api_key / env FLICKR_API_KEY)", give_up=True)


def expand_queries(ccfg, name: str) -> list[str]:
    """``query_templates`` x (class name + its synonyms), order kept, duplicates dropped."""
    terms = [name] + [s for s in ccfg.synonyms.get(name, []) if s and s.strip()]
    out: list[str] = []
    for term in terms:
        for t in ccfg.query_templates:
            q = t.replace("{c}", term.strip())
            if q not in out:
                out.append(q)
    return out


# ---- URL lists (local folders: pipeline.core.folder) ----

def load_url_list(path: Path, classes: list[str], url_column: str = "url",
                  class_column: str = "class") -> dict[str, list[str]]:
    """Read a URL list (txt: ``url`` or ``url<TAB>class``; csv/parquet: columns) -> {class: [urls]}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"crawl.url_list {path} does not exist")
    rows: list[tuple[str, str | None]] = []
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy: only for parquet URL lists

        schema = pq.read_schema(path)
        if url_column not in schema.names:
            raise ConfigError(f"{path}: no column {url_column!r} (set crawl.url_column; has {schema.names})")
        cols = [url_column] + ([class_column] if class_column in schema.names else [])
        table = pq.read_table(path, columns=cols).to_pydict()
        cl = table.get(class_column, [None] * len(table[url_column]))
        rows = [(str(u), None if c is None else str(c)) for u, c in zip(table[url_column], cl) if u]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if url_column not in (reader.fieldnames or []):
                raise ConfigError(f"{path}: no column {url_column!r} (set crawl.url_column; has {reader.fieldnames})")
            for r in reader:
                if r.get(url_column):
                    rows.append((r[url_column].strip(), r.get(class_column)))
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            url, _, cls = line.partition("\t")
            rows.append((url.strip(), cls.strip() or None))
    out: dict[str, list[str]] = {c: [] for c in classes}
    unknown = 0
    for i, (url, cls) in enumerate(rows):
        if cls is None or not str(cls).strip():
            if len(classes) != 1:
                raise ConfigError(f"{path}: row {i + 1} ({url[:80]}) has no class and the run has "
                                  f"{len(classes)} classes: add a class column / <TAB>class")
            name = classes[0]
        else:
            name = match_class(str(cls), classes)
            if name is None:
                unknown += 1
                continue
        if url not in out[name]:
            out[name].append(url)
    if unknown:
        log.warning("%s: %d rows name classes that are not in this run; skipped", path, unknown)
    return out
