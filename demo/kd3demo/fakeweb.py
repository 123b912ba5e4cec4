"""A local fake web: search engines and image hosts on 127.0.0.1, for tests and the offline demo.

A real HTTP server (``http.server.ThreadingHTTPServer`` in a background thread) that answers

* Bing image search (``/images/async?q=..&first=..``) with the HTML fragment Bing's async endpoint
  returns: ``<div class="imgpt"><a class="iusc" m="{json}">`` per result, the ``murl`` field holding the
  image URL, exactly what ``icrawler.builtin.bing.BingParser`` reads; 20 results per page, paged by
  ``first`` as ``BingFeeder`` asks.
* Baidu image search (``/search/acjson?tn=resultjson_com&ipn=rj&word=..&pn=..&rn=30``) with Baidu's JSON:
  ``{"queryEnc", "listNum", "displayNum", "data": [{"objURL": <obfuscated>, "hoverURL", ...}, ..., {}]}``;
  ``objURL`` is obfuscated with Baidu's substitution cipher, which ``BaiduParser._decode_url`` undoes.
* Google (``/search?q=..&tbm=isch``): by default a page whose scripts hold no image URLs (what icrawler's
  ``GoogleParser`` gets from today's Google); with ``google_results=True`` the URLs sit in a script.
* Flickr REST (``/services/rest/?method=flickr.photos.search|flickr.photos.getSizes&api_key=..``), the key
  checked against ``flickr_key``.

A query is answered with every image one of whose ``terms`` occurs in it as a word (case-insensitive).

Image routes: ``add_image(...)`` -> ``/img/<n>-<name>.jpg`` (every image URL ends in ``.jpg`` because
Bing's parser keeps only such URLs); ``add_redirect(target)``; ``add_flaky(status, fails)``. Fixed error
routes under ``/err/``: ``404.jpg``, ``slow.jpg`` (headers, then a long pause), ``redirect/<n>.jpg`` (a
chain of n redirects ending at an image), ``loop.jpg``, ``html.jpg`` (HTML served as image/jpeg),
``huge.jpg`` (``huge_bytes``, default 50 MB, generated lazily chunk by chunk: a 2 GB body costs the server
64 KiB of memory), ``drip.jpg`` (an endless body, one byte every 0.2 s: only a total cap or the deadline
ends it), ``bomb.png`` (a 200-byte PNG declaring 50000 x 50000 pixels), ``truncated.jpg``, ``noai.jpg`` (``X-Robots-Tag: noai``), ``private.jpg``
(redirect to a private address). ``malformed`` (a set of engine names) makes those engines answer
with broken pages. Every request is logged in ``.requests`` as ``(time, method, path, host_header)``.

``python -m kd3demo.fakeweb --images DIR`` serves ``DIR/<class>/*`` as fake Bing + Baidu.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image, ImageDraw

BING_PAGE = 20
BAIDU_PAGE = 30
HUGE_BYTES = 50 * 1024 * 1024

# Baidu's objURL obfuscation (the inverse of icrawler's BaiduParser._decode_url)
_BAIDU_MAP2 = {
    "w": "a", "k": "b", "v": "c", "1": "d", "j": "e", "u": "f", "2": "g", "i": "h", "t": "i", "3": "j",
    "h": "k", "s": "l", "4": "m", "g": "n", "5": "o", "r": "p", "q": "q", "6": "r", "f": "s", "p": "t",
    "7": "u", "e": "v", "o": "w", "8": "1", "d": "2", "n": "3", "9": "4", "c": "5", "m": "6", "0": "7",
    "b": "8", "l": "9", "a": "0",
}
_BAIDU_ENC = {v: k for k, v in _BAIDU_MAP2.items()}
_BAIDU_MAP1 = {":": "_z2C$q", ".": "_z&e3B", "/": "AzdH3F"}


def baidu_encode_url(url: str) -> str:
    """Obfuscate a URL the way Baidu's ``objURL`` field is (``BaiduParser._decode_url`` inverts it)."""
    out = []
    for ch in url:
        if ch in _BAIDU_MAP1:
            out.append(_BAIDU_MAP1[ch])
        else:
            out.append(_BAIDU_ENC.get(ch, ch))
    return "".join(out)


def make_jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 80, 40), seed: int = 0) -> bytes:
    """A small valid JPEG (a colour block with a seeded pattern, so different seeds give different bytes)."""
    img = Image.new("RGB", size, color)
    d = ImageDraw.Draw(img)
    for i in range(6):
        x = (seed * 7 + i * 13) % size[0]
        y = (seed * 11 + i * 5) % size[1]
        d.rectangle([x, y, x + 8, y + 8], fill=((seed * 37 + i * 50) % 256, (i * 90) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_png(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(w: int = 50_000, h: int = 50_000) -> bytes:
    """A ~100-byte PNG whose header declares ``w x h`` pixels: a decompression bomb by its header."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@dataclass
class _Image:
    path: str
    data: bytes
    content_type: str
    terms: list[str]
    headers: dict[str, str]
    delay_s: float
    title: str


@dataclass
class _Redirect:
    path: str
    target: str
    status: int
    terms: list[str]


@dataclass
class _Flaky:
    path: str
    status: int
    fails: int
    data: bytes
    content_type: str
    terms: list[str]
    served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _term_re(term: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(term.lower()) + r"(?!\w)")


def _query_re(query: str) -> re.Pattern:
    return re.compile(r"^\s*" + r"\s+".join(re.escape(w) for w in query.lower().split()) + r"\s*$")


class FakeWeb:
    """See the module docstring. Use as a context manager (``with FakeWeb() as fw:``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, google_results: bool = False,
                 flickr_key: str | None = "fake-flickr-key", slow_s: float = 30.0, huge_bytes: int = HUGE_BYTES):
        self.host = host
        self.huge_bytes = int(huge_bytes)
        self.port = port
        self.google_results = google_results
        self.flickr_key = flickr_key
        self.slow_s = slow_s
        self.malformed: set[str] = set()
        self.requests: list[tuple[float, str, str, str]] = []
        self._lock = threading.Lock()
        self._routes: dict[str, object] = {}
        self._results: list[tuple[str, list[re.Pattern], str]] = []  # (url, term patterns, title)
        self._n = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.default_jpeg = make_jpeg(seed=999)

    # ---- lifecycle ----
    def start(self) -> "FakeWeb":
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fakeweb", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeWeb":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def engine_urls(self) -> dict[str, str]:
        """Base URLs for ``crawl.engine_urls`` (every engine is served by this one server)."""
        return {"bing": self.base_url, "baidu": self.base_url, "google": self.base_url, "flickr": self.base_url}

    def url(self, path: str) -> str:
        return self.base_url + path

    # ---- content ----
    def _next_path(self, name: str) -> str:
        with self._lock:
            self._n += 1
            n = self._n
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[:40] or "img"
        return f"/img/{n}-{stem}.jpg"

    def add_result(self, url: str, terms: Iterable[str], title: str = "", queries: Iterable[str] = ()) -> str:
        """List any URL (also a foreign or an /err/ one) in the search results for ``terms`` (a term
        anywhere in the query) and for exactly the ``queries`` (case and spacing aside)."""
        pats = [_term_re(t) for t in terms if t and t.strip()] + [_query_re(q) for q in queries if q and q.strip()]
        with self._lock:
            self._results.append((url, pats, title or url.rsplit("/", 1)[-1]))
        return url

    def add_image(self, name: str, data: bytes, content_type: str = "image/jpeg", terms: Iterable[str] = (),
                  headers: dict[str, str] | None = None, delay_s: float = 0, queries: Iterable[str] = ()) -> str:
        """Serve ``data`` and list it for ``terms`` and exact ``queries``; returns its URL."""
        terms, queries = list(terms), list(queries)
        path = self._next_path(name)
        self._routes[path] = _Image(path, bytes(data), content_type, terms, dict(headers or {}), float(delay_s),
                                    Path(name).stem)
        url = self.url(path)
        if terms or queries:
            self.add_result(url, terms, Path(name).stem, queries)
        return url

    def add_redirect(self, target: str, terms: Iterable[str] = (), status: int = 302) -> str:
        """A URL that redirects to ``target`` (any host)."""
        path = self._next_path("redirect")
        terms = list(terms)
        self._routes[path] = _Redirect(path, target, status, terms)
        url = self.url(path)
        if terms:
            self.add_result(url, terms)
        return url

    def add_flaky(self, status: int = 429, fails: int = 2, data: bytes | None = None,
                  content_type: str = "image/jpeg", terms: Iterable[str] = ()) -> str:
        """A URL that answers ``status`` ``fails`` times, then the image."""
        path = self._next_path(f"flaky{status}")
        terms = list(terms)
        self._routes[path] = _Flaky(path, status, fails, data if data is not None else make_jpeg(seed=self._n),
                                    content_type, terms)
        url = self.url(path)
        if terms:
            self.add_result(url, terms)
        return url

    def err_url(self, name: str) -> str:
        """URL of a fixed error route: 404, slow, loop, html, huge, truncated, noai, private, redirect/<n>."""
        return self.url(f"/err/{name}.jpg")

    def search(self, query: str) -> list[tuple[str, str]]:
        """Every (url, title) whose term occurs in ``query`` as a word, in insertion order."""
        q = (query or "").lower()
        with self._lock:
            items = list(self._results)
        out, seen = [], set()
        for url, pats, title in items:
            if url not in seen and any(p.search(q) for p in pats):
                seen.add(url)
                out.append((url, title))
        return out

    def requested_paths(self, prefix: str = "") -> list[str]:
        return [r[2] for r in self.requests if r[2].startswith(prefix)]


# ---------------------------------------------------------------- rendering

def render_bing(results: list[tuple[str, str]], first: int) -> bytes:
    """Bing's /images/async HTML fragment (the parts BingParser and a browser use)."""
    page = results[first:first + BING_PAGE]
    items = []
    for i, (url, title) in enumerate(page):
        md5 = hashlib.md5(url.encode()).hexdigest()
        m = {"sid": "", "cturl": "", "cid": md5[:8], "purl": url.rsplit("/", 1)[0] + "/", "murl": url,
             "turl": f"https://tse1.mm.bing.net/th?id=OIP.{md5}&pid=15.1", "md5": md5, "shkey": "", "t": title,
             "mid": md5[:16].upper(), "desc": ""}
        m_attr = html.escape(json.dumps(m, ensure_ascii=False, separators=(",", ":")), quote=True)
        items.append(
            f'<li data-idx="{first + i + 1}"><div class="iuscp varh isv"><div class="imgpt">'
            f'<a class="iusc" style="height:180px;width:240px" m="{m_attr}" mad="{{&quot;turl&quot;:&quot;&quot;}}" '
            f'href="/images/search?view=detailV2&amp;id={md5}"><div class="img_cont hoff">'
            f'<img class="mimg" height="180" width="240" src="{html.escape(m["turl"])}" alt="{html.escape(title)}"/>'
            f'</div></a><div class="infopt"><a class="inflnk" href="{html.escape(m["purl"])}" '
            f'aria-label="{html.escape(title)}"></a></div></div></div></li>'
        )
    body = ('<!DOCTYPE html><html><head><meta charset="utf-8"/></head><body>'
            '<div class="dgControl hover" data-nextUrl="" data-iid="images.5204">'
            f'<ul class="dgControl_list">{"".join(items)}</ul></div></body></html>')
    return body.encode("utf-8")


def render_baidu(results: list[tuple[str, str]], word: str, pn: int, rn: int) -> bytes:
    page = results[pn:pn + rn]
    data = []
    for url, title in page:
        data.append({
            "adType": "0", "hasAspData": "0",
            "thumbURL": f"https://img1.baidu.com/it/u={int(hashlib.md5(url.encode()).hexdigest()[:8], 16)},0&fm=253&fmt=auto?w=200&h=200",
            "middleURL": f"https://img1.baidu.com/it/u={int(hashlib.md5(url.encode()).hexdigest()[:8], 16)},0&fm=253&fmt=auto?w=400&h=400",
            "largeTnImageUrl": "", "hasLarge": 0, "hoverURL": url,
            "pageNum": pn, "objURL": baidu_encode_url(url), "fromURL": baidu_encode_url(url.rsplit("/", 1)[0]),
            "fromURLHost": urlsplit(url).netloc, "currentIndex": "", "width": 640, "height": 480,
            "type": "jpg", "is_gif": 0, "strategyAssistant": "", "fromPageTitle": f"<strong>{html.escape(title)}</strong>",
            "bdSrcType": "0", "di": str(int(hashlib.md5(url.encode()).hexdigest()[8:18], 16)), "is": "0,0", "bdSetImgNum": 0,
            "fromPageTitleEnc": title, "token": "",
        })
    data.append({})  # Baidu ends the list with an empty object
    doc = {"queryEnc": quote(word), "queryExt": word, "listNum": len(results), "displayNum": len(results),
           "gsm": format(pn + rn, "x"), "bdFmtDispNum": f"约{len(results)}", "bdSearchTime": "",
           "isNeedAsyncRequest": 0, "bdIsClustered": "1", "data": data}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def render_google(results: list[tuple[str, str]], start: int, with_urls: bool) -> bytes:
    if with_urls:
        page = results[start:start + 100]
        arr = ",".join(f'[1,[0,"id{i}",["{u}",480,640],null,0]]' for i, (u, _) in enumerate(page))
        script = f"<script nonce=\"x\">AF_initDataCallback({{key: 'ds:1', data:[{arr}]}});</script>"
    else:
        script = "<script nonce=\"x\">(function(){window.google={kEI:'abc'};})();</script>"
    return (f"<!doctype html><html><head><title>Google Images</title>{script}</head>"
            "<body><div id=\"islrg\"></div></body></html>").encode("utf-8")


# ---------------------------------------------------------------- HTTP handler

class _Handler(BaseHTTPRequestHandler):
    """The fake web's HTTP side; ``web`` (the :class:`FakeWeb` it serves) is set per server."""

    web: "FakeWeb"
    protocol_version = "HTTP/1.1"
    server_version = "FakeWeb/1.0"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", "text/plain", {"Location": location})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.web.requests.append((time.time(), self.command, self.path, self.headers.get("Host", "")))
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self):
        parts = urlsplit(self.path)
        path, qs = parts.path, parse_qs(parts.query)
        q1 = lambda k, d="": qs.get(k, [d])[0]  # noqa: E731
        if path == "/images/async":  # Bing
            if "bing" in self.web.malformed:
                return self._send(200, b"<html><body><div class='imgpt'><a m='{broken", "text/html; charset=utf-8")
            res = self.web.search(q1("q"))
            return self._send(200, render_bing(res, int(q1("first", "0") or 0)), "text/html; charset=utf-8")
        if path == "/search/acjson":  # Baidu
            if "baidu" in self.web.malformed:
                return self._send(200, b'{"data": [{"objURL": "abc"', "text/plain; charset=utf-8")
            word = q1("word")
            res = self.web.search(word)
            body = render_baidu(res, word, int(q1("pn", "0") or 0), int(q1("rn", str(BAIDU_PAGE)) or BAIDU_PAGE))
            return self._send(200, body, "text/plain; charset=utf-8")
        if path == "/search":  # Google
            res = self.web.search(q1("q"))
            body = render_google(res, int(q1("start", "0") or 0), self.web.google_results and "google" not in self.web.malformed)
            return self._send(200, body, "text/html; charset=UTF-8")
        if path == "/services/rest/":  # Flickr
            return self._flickr(qs)
        if path.startswith("/err/"):
            return self._err(path[len("/err/"):])
        route = self.web._routes.get(path)
        if isinstance(route, _Image):
            return self._image(route)
        if isinstance(route, _Redirect):
            return self._redirect(route.target, route.status)
        if isinstance(route, _Flaky):
            with route.lock:
                route.served += 1
                fail = route.served <= route.fails
            if fail:
                return self._send(route.status, b"try again later", "text/plain", {"Retry-After": "0"})
            return self._send(200, route.data, route.content_type)
        return self._send(404, b"not found", "text/plain")

    def _image(self, img: _Image):
        if img.delay_s > 0:
            self.send_response(200)
            self.send_header("Content-Type", img.content_type)
            self.send_header("Content-Length", str(len(img.data)))
            for k, v in img.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.flush()
            self.web._stop.wait(img.delay_s)
            self.wfile.write(img.data)
            return
        return self._send(200, img.data, img.content_type, img.headers)

    def _err(self, name: str):
        base = name[:-4] if name.endswith(".jpg") else name
        if base == "404":
            return self._send(404, b"<html>not found</html>", "text/html")
        if base == "slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.web.default_jpeg)))
            self.end_headers()
            self.wfile.write(self.web.default_jpeg[:100])
            self.wfile.flush()
            self.web._stop.wait(self.web.slow_s)
            self.wfile.write(self.web.default_jpeg[100:])
            return
        if base.startswith("redirect/"):
            n = int(base.split("/", 1)[1])
            if n <= 0:
                return self._send(200, self.web.default_jpeg, "image/jpeg")
            return self._redirect(f"/err/redirect/{n - 1}.jpg")
        if base == "loop":
            return self._redirect("/err/loop2.jpg")
        if base == "loop2":
            return self._redirect(self.web.url("/err/loop.jpg"))
        if base == "private":
            return self._redirect("http://10.255.255.1/secret.jpg")
        if base == "html":
            return self._send(200, b"<!DOCTYPE html><html><body>Access denied</body></html>", "image/jpeg")
        if base == "noai":
            return self._send(200, make_jpeg(seed=4242), "image/jpeg", {"X-Robots-Tag": "noai"})
        if base == "truncated":
            data = make_jpeg(size=(120, 90), seed=77)
            return self._send(200, data[: len(data) // 2], "image/jpeg")
        if base == "huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")  # no Content-Length: the client must cut it
            self.end_headers()
            self.close_connection = True
            chunk = b"\xff\xd8\xff\xe0" + b"\0" * (1 << 16)  # one chunk, reused: memory stays flat
            sent = 0
            while sent < self.web.huge_bytes and not self.web._stop.is_set():
                piece = chunk[: min(len(chunk), self.web.huge_bytes - sent)]
                self.wfile.write(piece)
                sent += len(piece)
            return
        if base == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b"\xff\xd8\xff\xe0")
            self.wfile.flush()
            while not self.web._stop.wait(0.2):
                self.wfile.write(b"\0")
                self.wfile.flush()
            return
        if base == "bomb":
            return self._send(200, bomb_png(), "image/png")
        return self._send(404, b"not found", "text/plain")

    def _flickr(self, qs):
        q1 = lambda k, d="": qs.get(k, [d])[0]  # noqa: E731
        if self.web.flickr_key is None or q1("api_key") != self.web.flickr_key:
            body = {"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}
            return self._send(200, json.dumps(body).encode(), "application/json")
        method = q1("method")
        if method == "flickr.photos.search":
            res = self.web.search(q1("text") or q1("tags"))
            per_page = int(q1("per_page", "100") or 100)
            page = int(q1("page", "1") or 1)
            chunk = res[(page - 1) * per_page: page * per_page]
            photos = [{"id": str(i + (page - 1) * per_page), "owner": "1@N00", "secret": "s", "server": "1",
                       "farm": 1, "title": t, "ispublic": 1, "isfriend": 0, "isfamily": 0, "_url": u}
                      for i, (u, t) in enumerate(chunk)]
            with self.web._lock:
                self.web._flickr_ids = getattr(self.web, "_flickr_ids", {})
                for p in photos:
                    self.web._flickr_ids[p["id"]] = p.pop("_url")
            body = {"photos": {"page": page, "pages": max(1, -(-len(res) // per_page)), "perpage": per_page,
                               "total": len(res), "photo": photos}, "stat": "ok"}
            return self._send(200, json.dumps(body).encode(), "application/json")
        if method == "flickr.photos.getSizes":
            url = getattr(self.web, "_flickr_ids", {}).get(q1("photo_id"))
            if url is None:
                body = {"stat": "fail", "code": 1, "message": "Photo not found"}
            else:
                body = {"sizes": {"canblog": 0, "canprint": 0, "candownload": 1, "size": [
                    {"label": "Square", "width": 75, "height": 75, "source": url, "url": url, "media": "photo"},
                    {"label": "Original", "width": 640, "height": 480, "source": url, "url": url,
                     "media": "photo"}]}, "stat": "ok"}
            return self._send(200, json.dumps(body).encode(), "application/json")
        return self._send(200, json.dumps({"stat": "fail", "code": 112, "message": "Method not found"}).encode(),
                          "application/json")


def _make_handler(web: FakeWeb):
    return type("Handler", (_Handler,), {"web": web})


# ---------------------------------------------------------------- CLI: serve an image tree

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def serve_tree(web: FakeWeb, root: Path) -> dict[str, int]:
    """Serve every ``root/<class>/<file>`` image, listed for the class name (and its spaced form)."""
    counts: dict[str, int] = {}
    for cls_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        name = cls_dir.name
        terms = {name, name.replace("_", " "), name.replace("-", " ")}
        for f in sorted(cls_dir.iterdir()):
            ctype = IMAGE_TYPES.get(f.suffix.lower())
            if f.is_file() and ctype:
                web.add_image(f.name, f.read_bytes(), ctype, terms=sorted(terms))
                counts[name] = counts.get(name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kd3demo.fakeweb",
                                 description="Serve an image tree DIR/<class>/* as a local fake Bing + Baidu.")
    ap.add_argument("--images", type=Path, required=True, help="folder with one sub-folder of images per class")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        print(f"fakeweb: error: {args.images} is not a folder", flush=True)
        return 2
    web = FakeWeb(args.host, args.port).start()
    counts = serve_tree(web, args.images)
    if not counts:
        print(f"fakeweb: error: no images under {args.images}/<class>/", flush=True)
        web.stop()
        return 2
    for cls, n in counts.items():
        print(f"  {cls}: {n} images", flush=True)
    print(f"fake web at {web.base_url}", flush=True)
    print(f"--crawl.engine_urls.bing {web.base_url} --crawl.engine_urls.baidu {web.base_url} "
          f"--crawl.allow_private_hosts", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
