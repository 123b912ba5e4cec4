"""The fake web answers in the formats icrawler 0.6.10's own parsers read."""
from __future__ import annotations

import requests
from icrawler.builtin.baidu import BaiduParser
from icrawler.builtin.bing import BingParser
from icrawler.builtin.google import GoogleParser
from icrawler.utils import Signal

from kd3demo.fakeweb import baidu_encode_url, make_jpeg
from crawlers.sources import engine_page_urls
from pipeline.core.config import load_config


def _parse(parser_cls, url):
    r = requests.get(url, timeout=5)
    return [t["file_url"] for t in (parser_cls(1, Signal(), requests.Session()).parse(r) or [])]


def test_bing_pages_parse_with_icrawler(fw, add_images):
    urls = add_images(fw, "cat", 25)
    add_images(fw, "dog", 3, seed0=100)
    cfg = load_config(None, {"crawl.engine_urls": fw.engine_urls(), "crawl.max_results_per_query": 60})
    pages = engine_page_urls("bing", cfg.crawl, "a photo of a Cat")
    assert len(pages) == 3 and "first=20" in pages[1]
    got = _parse(BingParser, pages[0]) + _parse(BingParser, pages[1])
    assert got == urls  # 20 + 5, in order, no dogs
    assert _parse(BingParser, pages[2]) == []
    # a term must occur as a word: "category" is not "cat"
    assert _parse(BingParser, fw.base_url + "/images/async?q=category&first=0") == []


def test_baidu_json_and_cipher_round_trip(fw, add_images):
    urls = add_images(fw, "dog", 31)
    p = BaiduParser(1, Signal(), requests.Session())
    for u in urls[:3] + ["https://example.com/a/b_c-9.jpg?x=1&y=z"]:
        assert p._decode_url(baidu_encode_url(u)) == u
    cfg = load_config(None, {"crawl.engine_urls": fw.engine_urls(), "crawl.max_results_per_query": 60})
    pages = engine_page_urls("baidu", cfg.crawl, "dog photo")
    assert len(pages) == 2 and "pn=30" in pages[1] and "rn=30" in pages[0]
    assert _parse(BaiduParser, pages[0]) + _parse(BaiduParser, pages[1]) == urls


def test_google_default_page_has_no_urls_and_optional_results(fw, add_images):
    add_images(fw, "cat", 3)
    assert _parse(GoogleParser, fw.base_url + "/search?q=cat&tbm=isch") == []
    fw.google_results = True
    assert len(_parse(GoogleParser, fw.base_url + "/search?q=cat&tbm=isch")) == 3


def test_request_log_and_error_routes(fw):
    r = requests.get(fw.err_url("404"), timeout=5)
    assert r.status_code == 404
    r = requests.get(fw.err_url("html"), timeout=5)
    assert r.headers["Content-Type"] == "image/jpeg" and r.content.startswith(b"<!DOCTYPE html>")
    r = requests.get(fw.err_url("noai"), timeout=5)
    assert r.headers["X-Robots-Tag"] == "noai"
    flaky = fw.add_flaky(429, fails=1)
    assert requests.get(flaky, timeout=5).status_code == 429
    assert requests.get(flaky, timeout=5).content[:3] == b"\xff\xd8\xff"
    assert [p for _, m, p, h in fw.requests if h.startswith("127.0.0.1:")][:2] == ["/err/404.jpg", "/err/html.jpg"]
    assert make_jpeg(seed=1) != make_jpeg(seed=2)


def test_serve_tree_lists_each_class_folder(tmp_path, fw):
    from kd3demo.fakeweb import serve_tree

    for cls, n in (("golden_retriever", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.jpg").write_bytes(make_jpeg(seed=i + len(cls)))
    (tmp_path / "cat" / "readme.txt").write_text("skip me")
    assert serve_tree(fw, tmp_path) == {"cat": 1, "golden_retriever": 2}
    assert len(_parse(BingParser, fw.base_url + "/images/async?q=golden%20retriever&first=0")) == 2
