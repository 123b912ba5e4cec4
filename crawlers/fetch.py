"""kd3's polite fetcher: every URL gets an outcome (ok, or one error reason), nothing hangs.

* only ``http``/``https``; the host is DNS-resolved and private, loopback, link-local, reserved and
  multicast addresses are refused *before* connecting (``crawl.allow_private_hosts``,
  ``crawl.allowed_networks``); redirects are followed by hand (at most 5 hops, loops detected), each hop
  checked the same way;
* a per-domain rate limiter (a thread-safe token bucket holding one token: requests to one host are
  spaced at least ``1 / rate_limit_per_domain`` seconds apart);
* connect/read timeouts, a total time cap per body, retries with exponential backoff on connection
  errors, 429 and 5xx (``Retry-After`` honoured up to 30 s);
* ``stream=True`` with the body cut at ``max_bytes`` (``too_large``), a content-type and magic-byte check
  (JPEG, PNG, GIF, WebP, BMP, TIFF), truncated JPEG/PNG detection, ``X-Robots-Tag: noai / noimageai /
  noindex / noimageindex`` honoured like img2dataset;
* a global deadline: past it every call returns ``deadline`` at once; after a Ctrl-C
  (:mod:`pipeline.core.interrupt`) every call, and every body still streaming, ends as ``interrupted``.

Error reasons (``FetchResult.error``): ``bad_scheme``, ``bad_url``, ``dns``, ``private_host``,
``connection``, ``timeout``, ``http_<code>``, ``too_many_redirects``, ``redirect_loop``, ``robots``,
``bad_content_type``, ``too_large``, ``truncated``, ``not_image``, ``deadline``, ``interrupted``.
"""
from __future__ import annotations

import io
import ipaddress
import logging
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image

from pipeline.core.interrupt import stop_requested

log = logging.getLogger("kd3.crawl.fetch")

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
PAGE_MAX_BYTES = 10_000_000
# icrawler's browser-like headers for search-engine result pages (engines serve other markup to bots)
BROWSER_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")
ROBOTS_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
_SECRET_PARAM = re.compile(r"((?:api_key|apikey|key|token|access_token|sig)=)[^&\s]+", re.I)


_CRED_IN_URL = re.compile(r"(//[^/@\s:]+):[^@\s/]+@")
_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """A value (API key, proxy password) that ``redact`` removes wherever it appears."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """Remove API keys, tokens and URL credentials from a URL or message before it is logged or recorded."""
    s = _CRED_IN_URL.sub(r"\1:***@", _SECRET_PARAM.sub(r"\1***", str(text)))
    for v in _SECRETS:
        s = s.replace(v, "***")
    return s


class RedactFilter(logging.Filter):
    """Redacts records of third-party loggers (urllib3 logs every request URL, key included, at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to break
            return True
        red = redact(msg)
        if red != msg:
            record.msg, record.args = red, ()
        return True


_REDACT = RedactFilter()
for _name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.connection", "urllib3.util.retry",
              "urllib3.response", "requests", "icrawler", "kd3", "kd3.crawl", "kd3.crawl.fetch",
              "kd3.crawl.sources", "crawlers.sources", "crawlers.stage"):
    logging.getLogger(_name).addFilter(_REDACT)


# ---------------------------------------------------------------- image sniffing

def sniff_image(data: bytes) -> str | None:
    """File extension from the magic bytes, or None when ``data`` is not a supported image."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) > 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return None


def looks_truncated(data: bytes, ext: str) -> bool:
    """A JPEG without its end-of-image marker or a PNG without IEND near the end."""
    if ext == "jpg":
        tail = data.rstrip(b"\x00\r\n\t ")
        if tail.endswith(b"\xff\xd9"):
            return False
        # some cameras append a trailer after EOI: accept an EOI in the last 4 KiB of a big file
        return not (len(data) > 16384 and data.rfind(b"\xff\xd9") >= len(data) - 4096)
    if ext == "png":
        return b"IEND" not in data[-64:]
    return False


def image_size(data: bytes) -> tuple[int, int]:
    """(w, h) from the header only (cheap); raises on an unreadable image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]), int(im.size[1])


def check_image_bytes(data: bytes) -> tuple[str | None, str, str, int, int]:
    """Validate downloaded/local bytes: (error | None, detail, ext, w, h)."""
    ext = sniff_image(data)
    if ext is None:
        head = data[:16].lstrip().lower()
        what = "HTML" if head.startswith((b"<!doctype", b"<html")) else "unknown bytes"
        return "not_image", f"magic bytes are not an image ({what})", "", 0, 0
    if looks_truncated(data, ext):
        return "truncated", f"{ext} body ends before its end marker", ext, 0, 0
    try:
        w, h = image_size(data)
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        name = type(e).__name__
        if "DecompressionBomb" in name:
            return "bomb", str(e)[:200], ext, 0, 0
        return "not_image", f"header unreadable ({name})", ext, 0, 0
    return None, "", ext, w, h


def robots_disallows(values: list[str], ua_token: str = "kd3") -> bool:
    """img2dataset's X-Robots-Tag rule: ``noai`` etc., globally or for ``*``/our user agent."""
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if ":" in part:
                ua, _, directive = part.partition(":")
                if ua.strip() not in ("*", ua_token.lower()):
                    continue
                part = directive.strip()
            if part in ROBOTS_DISALLOWED:
                return True
    return False


# ---------------------------------------------------------------- rate limiting

class RateLimiter:
    """Per-domain token bucket of capacity one: calls for one host are spaced >= 1/rate apart."""

    def __init__(self, rate_per_s: float):
        self.interval = 1.0 / float(rate_per_s)
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        """Reserve the next slot for ``host``; returns the monotonic time to wait until."""
        with self._lock:
            now = time.monotonic()
            t = max(now, self._next.get(host, 0.0))
            self._next[host] = t + self.interval
            return t

    def acquire(self, host: str, deadline: float | None = None) -> bool:
        t = self.reserve(host)
        wait = t - time.monotonic()
        if deadline is not None and t > deadline:
            return False
        if wait > 0:
            time.sleep(wait)
        return True


# ---------------------------------------------------------------- fetching

@dataclass
class FetchResult:
    url: str
    ok: bool
    error: str = ""
    detail: str = ""
    data: bytes | None = None
    final_url: str = ""
    http_status: int = 0
    content_type: str = ""
    ext: str = ""
    w: int = 0
    h: int = 0


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Fetcher:
    """Shared by all download threads of a crawl (one rate limiter, one deadline)."""

    def __init__(self, ccfg, deadline: float | None = None, sleep=time.sleep):
        self.cfg = ccfg
        self.deadline = deadline  # time.monotonic() value
        self.limiter = RateLimiter(ccfg.rate_limit_per_domain)
        self._local = threading.local()
        self._sleep = sleep
        self._networks = [ipaddress.ip_network(n, strict=False) for n in (ccfg.allowed_networks or [])]
        self.ua_token = (ccfg.user_agent.split("/")[0] or "kd3").strip()
        key = ccfg.flickr_key() if hasattr(ccfg, "flickr_key") else None
        register_secret(key)
        if getattr(ccfg, "proxy", None) is not None:
            try:
                register_secret(urlsplit(ccfg.proxy.get_secret_value()).password)
            except ValueError:
                pass

    # -- plumbing
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.max_redirects = MAX_REDIRECTS
            if self.cfg.proxy is not None:
                p = self.cfg.proxy.get_secret_value()
                s.proxies = {"http": p, "https": p}
            self._local.session = s
        return s

    def past_deadline(self) -> bool:
        """Past the crawl deadline, or kd3 was interrupted (Ctrl-C): either way, stop fetching."""
        return stop_requested() or (self.deadline is not None and time.monotonic() >= self.deadline)

    @staticmethod
    def _stopped(detail: str) -> FetchError:
        """``interrupted`` after a Ctrl-C, else ``deadline``; both are tried again by a rerun."""
        return FetchError("interrupted", "kd3 was interrupted") if stop_requested() else FetchError("deadline", detail)

    def check_url(self, url: str) -> str:
        """Raise FetchError unless ``url`` is http(s) on an allowed address; returns the host."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise FetchError("bad_url", f"{url[:200]}: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise FetchError("bad_scheme", f"scheme {parts.scheme or '(none)'!r} refused (only http/https)")
        if not host:
            raise FetchError("bad_url", "no host")
        if self.cfg.allow_private_hosts:
            return host
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise FetchError("dns", f"{host}: {e}") from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if any(ip in n for n in self._networks):
                continue
            if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
                raise FetchError("private_host", f"{host} resolves to non-public address {ip}")
        return host

    def _get(self, url: str, host: str, headers: dict) -> requests.Response:
        """One GET with retries on connection errors, 429 and 5xx (returns the final response)."""
        c = self.cfg
        attempt = 0
        while True:
            if stop_requested() or not self.limiter.acquire(host, self.deadline):
                raise self._stopped("crawl deadline reached")
            try:
                r = self._session().get(url, stream=True, allow_redirects=False, headers=headers,
                                        timeout=(c.connect_timeout_s, c.read_timeout_s))
            except requests.exceptions.ReadTimeout:
                raise FetchError("timeout", f"no response within {c.read_timeout_s:g}s") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                reason, detail = ("timeout", "connect timeout") if isinstance(
                    e, requests.exceptions.ConnectTimeout) else ("connection", type(e).__name__)
                if attempt >= c.retries:
                    raise FetchError(reason, detail) from None
                self._backoff(attempt, None)
                attempt += 1
                continue
            except requests.exceptions.RequestException as e:
                raise FetchError("bad_url", f"{type(e).__name__}: {redact(e)}"[:300]) from None
            if r.status_code == 429 or 500 <= r.status_code < 600:
                retry_after = r.headers.get("Retry-After")
                r.close()
                if attempt >= c.retries:
                    raise FetchError(f"http_{r.status_code}", f"still {r.status_code} after {attempt} retries")
                self._backoff(attempt, retry_after)
                attempt += 1
                continue
            return r

    def _backoff(self, attempt: int, retry_after: str | None) -> None:
        delay = self.cfg.backoff_s * (2 ** attempt)
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(30.0, float(retry_after)))
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            raise FetchError("deadline", "crawl deadline reached during backoff")
        self._sleep(delay)

    def _open(self, url: str, headers: dict) -> requests.Response:
        """Follow redirects by hand, checking every hop; returns a 2xx response (body unread)."""
        seen = set()
        cur = url
        for hop in range(MAX_REDIRECTS + 1):
            if self.past_deadline():
                raise self._stopped("crawl deadline reached")
            host = self.check_url(cur)
            seen.add(cur)
            r = self._get(cur, host, headers)
            if r.is_redirect or r.status_code in (301, 302, 303, 307, 308):
                loc = r.headers.get("Location")
                r.close()
                if not loc:
                    raise FetchError(f"http_{r.status_code}", "redirect without Location")
                nxt = urljoin(cur, loc)
                if nxt in seen:
                    raise FetchError("redirect_loop", f"{redact(nxt)[:200]} visited twice")
                cur = nxt
                continue
            if r.status_code >= 400 or r.status_code < 200:
                r.close()
                raise FetchError(f"http_{r.status_code}", "")
            r.kd3_final_url = cur  # type: ignore[attr-defined]
            return r
        raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    def _read(self, r: requests.Response, max_bytes: int) -> bytes:
        cl = r.headers.get("Content-Length")
        if cl and cl.isdigit() and int(cl) > max_bytes:
            r.close()
            raise FetchError("too_large", f"Content-Length {cl} > max_bytes {max_bytes}")
        t0 = time.monotonic()
        cap = max(3 * self.cfg.read_timeout_s, self.cfg.connect_timeout_s + self.cfg.read_timeout_s)
        buf = bytearray()
        # read1: return whatever arrived (<= CHUNK) instead of blocking until CHUNK bytes came, so a body
        # that drips one byte at a time (never idle long enough for the read timeout) still hits the
        # per-body cap and the crawl deadline between reads
        read = getattr(r.raw, "read1", None)
        try:
            while True:
                chunk = read(CHUNK, decode_content=True) if read is not None else r.raw.read(CHUNK, decode_content=True)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > max_bytes:
                    raise FetchError("too_large", f"body exceeds max_bytes {max_bytes}")
                if time.monotonic() - t0 > cap:
                    raise FetchError("timeout", f"body took more than {cap:g}s")
                if self.past_deadline():
                    raise self._stopped("crawl deadline reached while reading")
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout, TimeoutError):
            raise FetchError("timeout", f"body stalled for {self.cfg.read_timeout_s:g}s") from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, ConnectionError) as e:
            raise FetchError("truncated", f"connection broke mid-body ({type(e).__name__})") from None
        except requests.exceptions.ConnectionError as e:
            if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
                raise FetchError("timeout", f"body stalled for {self.cfg.read_timeout_s:g}s") from None
            raise FetchError("truncated", f"connection broke mid-body ({type(e).__name__})") from None
        except requests.exceptions.ChunkedEncodingError as e:
            raise FetchError("truncated", f"body shorter than announced ({type(e).__name__})") from None
        finally:
            r.close()
        return bytes(buf)

    # -- public
    def fetch_image(self, url: str) -> FetchResult:
        res = FetchResult(url=url, ok=False)
        try:
            r = self._open(url, {"User-Agent": self.cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
            res.final_url = getattr(r, "kd3_final_url", url)
            res.http_status = r.status_code
            res.content_type = r.headers.get("Content-Type", "")
            if self.cfg.respect_x_robots_tag:
                tags = r.raw.headers.getlist("X-Robots-Tag") if hasattr(r.raw.headers, "getlist") else []
                if not tags and r.headers.get("X-Robots-Tag"):
                    tags = [r.headers["X-Robots-Tag"]]
                if robots_disallows(tags, self.ua_token):
                    r.close()
                    raise FetchError("robots", f"X-Robots-Tag: {', '.join(tags)}")
            ctype = res.content_type.split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype in (
                    "application/octet-stream", "binary/octet-stream", "application/binary")):
                r.close()
                raise FetchError("bad_content_type", f"Content-Type {ctype}")
            data = self._read(r, self.cfg.max_bytes)
            err, detail, ext, w, h = check_image_bytes(data)
            res.data = data
            if err:
                raise FetchError(err, detail)
            res.ok, res.ext, res.w, res.h = True, ext, w, h
        except FetchError as e:
            res.ok, res.error, res.detail = False, e.reason, redact(e.detail)
        return res

    def fetch_page(self, url: str, max_bytes: int = PAGE_MAX_BYTES) -> bytes:
        """A search-engine result page (browser-like headers, like icrawler); raises FetchError."""
        parts = urlsplit(url)
        headers = {"User-Agent": BROWSER_UA, "Referer": f"{parts.scheme}://{parts.netloc}",
                   "Accept-Language": "en-US,en;q=0.9"}
        r = self._open(url, headers)
        return self._read(r, max_bytes)
