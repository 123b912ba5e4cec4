"""Hostile web input against the local fake web: every URL ends with one recorded reason, nothing hangs,
nothing is held in memory beyond the byte cap, nothing is fetched from a place it must not be."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

from crawlers.fetch import Fetcher
from pipeline.core.config import load_config
from pipeline.core.io import read_jsonl

from reliability_helpers import REPO, rss_mb


def _ccfg(**kw):
    ov = {"crawl.rate_limit_per_domain": 1000.0, "crawl.backoff_s": 0.01, "crawl.retries": 0,
          "crawl.read_timeout_s": 2.0, "crawl.connect_timeout_s": 2.0, "crawl.max_bytes": 2_000_000,
          "crawl.allowed_networks": ["127.0.0.1/32"]}
    ov.update({f"crawl.{k}": v for k, v in kw.items()})
    return load_config(None, ov).crawl


def test_hostile_bodies_each_get_a_reason(fw):
    f = Fetcher(_ccfg())
    got = {name: f.fetch_image(fw.err_url(name)) for name in ("html", "truncated", "loop", "404", "noai")}
    assert {k: r.error for k, r in got.items()} == {
        "html": "not_image", "truncated": "truncated", "loop": "redirect_loop", "404": "http_404", "noai": "robots"}
    assert not any(r.ok for r in got.values())
    # an image the fake web serves fine passes the same fetcher (the checks are not just "refuse all")
    assert f.fetch_image(fw.err_url("redirect/2")).ok


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "bad_scheme"),
    ("ftp://127.0.0.1/cat.jpg", "bad_scheme"),
    ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
     "bad_scheme"),
    ("gopher://127.0.0.1:70/", "bad_scheme"),
    ("http://", "bad_url"),
])
def test_non_http_urls_refused(url, reason):
    # allow_private_hosts=True: even with every address allowed, only http(s) is ever opened
    r = Fetcher(_ccfg(allow_private_hosts=True)).fetch_image(url)
    assert not r.ok and r.error == reason and r.data is None


def test_file_url_redirect_target_refused(fw):
    """A redirect to file:// is checked like the first URL (the local file is never read)."""
    url = fw.add_redirect("file:///etc/passwd")
    r = Fetcher(_ccfg()).fetch_image(url)
    assert r.error == "bad_scheme" and r.data is None


class _Listener:
    """A TCP listener that counts connections (to prove a refused address is never connected to)."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
                self.accepted += 1
                c.close()
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


def test_redirect_to_loopback_refused_before_connecting(fw):
    """127.0.0.1 (the fake web) is allowed explicitly; a redirect to another loopback address is refused
    by address, before any TCP connection is made to it."""
    target = _Listener("127.0.0.2")
    try:
        hop = fw.add_redirect(f"http://127.0.0.2:{target.port}/secret.jpg")
        r = Fetcher(_ccfg()).fetch_image(hop)
        assert r.error == "private_host" and "127.0.0.2" in r.detail
        # the private 10/8 redirect route as well, and a direct URL
        assert Fetcher(_ccfg()).fetch_image(fw.err_url("private")).error == "private_host"
        assert Fetcher(_ccfg()).fetch_image(f"http://127.0.0.2:{target.port}/x.jpg").error == "private_host"
        time.sleep(0.3)
        assert target.accepted == 0
        # control: with the protection off the same redirect does connect (the listener sees it)
        r2 = Fetcher(_ccfg(allow_private_hosts=True, retries=0)).fetch_image(hop)
        assert r2.error != "private_host"
        time.sleep(0.3)
        assert target.accepted >= 1
    finally:
        target.close()


def test_endless_slow_body_ends_at_the_deadline(fw):
    """/err/drip.jpg never finishes and never stalls long enough for a read timeout: only the
    crawl deadline (or the per-body cap) ends it, with a recorded reason."""
    f = Fetcher(_ccfg(read_timeout_s=30.0), deadline=time.monotonic() + 1.5)
    r = f.fetch_image(fw.err_url("drip"))
    assert not r.ok and r.error == "deadline"
    # past the deadline, every further URL ends at once with the same reason (no new connection)
    n = len(fw.requests)
    assert f.fetch_image(fw.err_url("404")).error == "deadline" and len(fw.requests) == n


def test_endless_slow_body_ends_at_the_body_cap(fw):
    r = Fetcher(_ccfg(read_timeout_s=0.5, connect_timeout_s=0.5)).fetch_image(fw.err_url("drip"))
    assert not r.ok and r.error == "timeout"


_HUGE_CLIENT = textwrap.dedent("""
    import json, resource, sys
    from crawlers.fetch import Fetcher
    from pipeline.core.config import load_config
    cfg = load_config(None, {"crawl.allowed_networks": ["127.0.0.1/32"], "crawl.max_bytes": int(sys.argv[2]),
                             "crawl.retries": 0, "crawl.rate_limit_per_domain": 1000.0})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = Fetcher(cfg.crawl).fetch_image(sys.argv[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"error": r.error, "detail": r.detail, "before_mb": before, "peak_mb": peak}))
""")


def test_2gb_response_is_streamed_and_cut_at_the_byte_cap(tmp_path):
    """A 2 GiB body without Content-Length: the server generates it lazily, the client (a separate
    process, so its peak RSS is its own) stops at max_bytes; neither side holds the body in memory."""
    from kd3demo.fakeweb import FakeWeb

    cap = 20_000_000
    rss0 = rss_mb()
    with FakeWeb(huge_bytes=2 * 1024**3) as web:
        p = subprocess.run([sys.executable, "-c", _HUGE_CLIENT, web.err_url("huge"), str(cap)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert p.returncode == 0, p.stderr[-2000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        server_growth = rss_mb() - rss0
    assert out["error"] == "too_large" and str(cap) in out["detail"]
    # the client grew by about the cap (bytearray + one copy), never by the 2 GiB body
    assert out["peak_mb"] - out["before_mb"] < 3 * cap / 2**20 + 40, out
    assert server_growth < 100, server_growth


def test_bomb_downloaded_then_dropped_by_curate_with_reason(tmp_path, fw, crawl_helpers):
    """A PNG declaring 50000x50000 pixels: the crawl keeps its ~100 bytes (or records `bomb`);
    curate never decodes it and records the drop reason `bomb`."""
    fw.add_result(fw.err_url("bomb"), ["cat"])
    crawl_helpers.add_images(fw, "cat", 3)
    cfg = crawl_helpers.cfg_for(tmp_path, fw, crawl__per_class=10, crawl__threads=1)
    from crawlers.stage import crawl

    crawl(cfg)
    rec = {r["url"]: r for r in read_jsonl(cfg.run_dir / "crawl" / "records.jsonl")}[fw.err_url("bomb")]
    assert (rec["status"], rec["error"]) in (("ok", None), ("error", "bomb"))
    if rec["status"] == "ok":
        from pipeline.curate import curate

        cur = load_config(None, {"name": cfg.name, "runs_root": str(cfg.runs_root), "classes": ["cat"],
                                 "curate.clip_model": "kd3-tiny-clip", "curate.clip_pretrained": None,
                                 "curate.device": "cpu", "curate.workers": 0, "curate.min_side": 8, "curate.near_dup": False,
                                 "curate.batch_size": 8})
        m = curate(cur)
        dec = {d["id"]: d for d in read_jsonl(cfg.run_dir / "curate" / "decisions.jsonl")}
        assert dec[rec["sha256"]]["kept"] is False and dec[rec["sha256"]]["reason"] == "bomb"
        assert m["nsamples"] == 3


def test_malformed_search_pages_end_cleanly(tmp_path, fw, crawl_helpers):
    """Both engines answer with broken pages: the crawl finishes (exit 1: under target), says why
    per class, and no traceback reaches the user."""
    fw.malformed = {"bing", "baidu"}
    crawl_helpers.add_images(fw, "cat", 3)
    from reliability_helpers import kd3

    r = kd3("crawl", "--set", f"runs_root={tmp_path}", "--set", "name=m", "--classes", "cat",
            "--crawl.sources", "bing,baidu", "--crawl.engine_urls.bing", fw.base_url,
            "--crawl.engine_urls.baidu", fw.base_url, "--crawl.allow_private_hosts", "--crawl.per_class", "3",
            "--crawl.rate_limit_per_domain", "1000", "--crawl.retries", "0")
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    s = json.loads((tmp_path / "m" / "crawl" / "summary.json").read_text())
    assert s["classes"]["cat"]["downloaded"] == 0 and not s["classes"]["cat"]["done"]
    assert any(p.startswith("/images/async") for p in fw.requested_paths())
    assert any(p.startswith("/search/acjson") for p in fw.requested_paths())
