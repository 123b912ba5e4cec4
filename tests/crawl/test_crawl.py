"""The crawl stage against the fake web: counts, records, dedup, error reasons, sources, safety."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from kd3demo.fakeweb import make_jpeg, make_png
from crawlers.sources import GOOGLE_ZERO
from crawlers.stage import class_done, crawl, crawl_class
from pipeline.app.cli import main
from pipeline.core.io import read_jsonl, sha256_file
from pipeline.core.records import RECORD_FIELDS
from pipeline.core.runs import RunDir


def _records(cfg):
    return read_jsonl(RunDir(cfg.run_dir).records)


def _by_url(cfg):
    return {r["url"]: r for r in _records(cfg)}


def test_cli_crawl_counts_records_and_store(tmp_path, fw, add_images):
    cats = add_images(fw, "cat", 7)
    dogs = [fw.add_image(f"dog{i}.png", make_png(color=(i * 30, 90, 10)), "image/png", terms=["dog"])
            for i in range(4)]
    run = tmp_path / "runs" / "cli"
    rc = main(["crawl", "--set", f"runs_root={tmp_path / 'runs'}", "--set", "name=cli",
               "--set", "classes=[cat, dog]", "--crawl.sources", "bing,baidu",
               "--crawl.engine_urls.bing", fw.base_url, "--crawl.engine_urls.baidu", fw.base_url,
               "--crawl.allow_private_hosts", "--crawl.per_class", "5", "--crawl.rate_limit_per_domain", "500"])
    assert rc == 0
    rows = read_jsonl(run / "crawl" / "records.jsonl")
    assert rows and all(tuple(r) == RECORD_FIELDS for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert Counter(r["class"] for r in ok) == {"cat": 5, "dog": 4}  # cat stops at the target; 4 dogs exist
    for r in ok:
        p = run / r["path"]
        assert p.is_file() and sha256_file(p) == r["sha256"] and p.stat().st_size == r["bytes"]
        assert r["path"] == f"crawl/images/{r['sha256'][:2]}/{r['sha256']}.{'png' if r['class'] == 'dog' else 'jpg'}"
        assert r["engine"] in ("bing", "baidu") and r["query"] and r["w"] > 0 and r["h"] > 0
    assert {r["url"] for r in ok if r["class"] == "cat"} == set(cats[:5])
    assert {r["url"] for r in ok if r["class"] == "dog"} == set(dogs)
    summary = json.loads((run / "crawl" / "summary.json").read_text())
    assert summary["classes"]["cat"]["downloaded"] == 5 and summary["classes"]["cat"]["done"]
    assert summary["classes"]["dog"]["downloaded"] == 4 and not summary["classes"]["dog"]["done"]
    assert (run / "config.yaml").is_file()
    # dog fell back from bing to baidu: both engines were asked for dog
    paths = fw.requested_paths()
    assert any(p.startswith("/images/async?q=dog") for p in paths)
    assert any(p.startswith("/search/acjson") and "word=dog" in p for p in paths)


def test_same_bytes_two_urls_stored_once_recorded_twice(tmp_path, fw, cfg_for):
    data = make_jpeg(seed=5)
    a = fw.add_image("a.jpg", data, terms=["cat"])
    b = fw.add_image("b.jpg", data, terms=["cat photo"])  # found only by the second query
    fw.add_image("c.jpg", make_jpeg(seed=6), terms=["cat"])
    cfg = cfg_for(tmp_path, fw, crawl__threads=1)
    s = crawl(cfg)
    rows = _by_url(cfg)
    assert rows[a]["status"] == "ok" and rows[b]["status"] == "duplicate"
    assert rows[a]["sha256"] == rows[b]["sha256"] and rows[a]["path"] == rows[b]["path"]
    assert rows[b]["query"] == "cat photo"
    files = [p for p in (RunDir(cfg.run_dir).images).rglob("*") if p.is_file()]
    assert len(files) == 2
    assert s["classes"]["cat"]["downloaded"] == 2 and s["classes"]["cat"]["duplicates"] == 1


def test_error_reasons(tmp_path, fw, cfg_for):
    flaky = fw.add_flaky(429, fails=2)
    dead = fw.add_flaky(500, fails=99)
    urls = {
        fw.err_url("404"): "http_404",
        fw.err_url("html"): "not_image",
        fw.err_url("truncated"): "truncated",
        fw.err_url("noai"): "robots",
        fw.err_url("huge"): "too_large",
        fw.err_url("loop"): "redirect_loop",
        fw.err_url("redirect/7"): "too_many_redirects",
        fw.err_url("slow"): "timeout",
        dead: "http_500",
        "file:///etc/passwd": "bad_scheme",
        "ftp://example.com/x.jpg": "bad_scheme",
        "data:image/png;base64,AAAA": "bad_scheme",
        fw.url("/err/redirect/3.jpg"): None,  # a chain of 3 redirects is fine
        flaky: None,  # 429 twice, then the image
    }
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    cfg = cfg_for(tmp_path, fw, crawl__sources=["urls"], crawl__url_list=str(lst), crawl__read_timeout_s=0.5,
                  crawl__retries=2, crawl__max_bytes=1_000_000)
    crawl(cfg)
    rows = _by_url(cfg)
    assert set(rows) == set(urls)
    for u, reason in urls.items():
        r = rows[u]
        if reason is None:
            assert r["status"] == "ok", (u, r)
        else:
            assert (r["status"], r["error"]) == ("error", reason), (u, r)
    assert fw.requested_paths().count(flaky.split(fw.base_url)[1]) == 3
    assert fw.requested_paths().count(dead.split(fw.base_url)[1]) == 3  # 1 try + 2 retries
    assert not list(RunDir(cfg.run_dir).root.rglob("*.tmp"))


def test_private_addresses_refused_before_any_request(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "cat", 3)
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{fw.err_url('404')}\nhttp://localhost:{fw.port}/x.jpg\nhttp://169.254.169.254/latest/x.jpg\n")
    cfg = cfg_for(tmp_path, fw, crawl__allow_private_hosts=False, crawl__sources=["urls", "bing"],
                  crawl__url_list=str(lst))
    s = crawl(cfg)
    rows = _records(cfg)
    assert len(rows) == 3 and {r["error"] for r in rows} == {"private_host"}
    assert fw.requests == []  # nothing reached the server, not even the search page
    assert any("private_host" in n for n in s["classes"]["cat"]["notes"])
    assert s["ok"] is False


def test_redirect_to_private_host_refused(tmp_path, fw, cfg_for):
    lst = tmp_path / "urls.txt"
    lst.write_text(fw.err_url("private") + "\n")
    cfg = cfg_for(tmp_path, fw, crawl__allow_private_hosts=False, crawl__allowed_networks=["127.0.0.1/32"],
                  crawl__sources=["urls"], crawl__url_list=str(lst))
    crawl(cfg)
    (r,) = _records(cfg)
    assert (r["status"], r["error"]) == ("error", "private_host")
    assert fw.requested_paths() == ["/err/private.jpg"]


def test_rate_limit_per_domain(tmp_path, fw, cfg_for, add_images, monkeypatch):
    from crawlers.fetch import RateLimiter

    urls = add_images(fw, "cat", 6)
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    cfg = cfg_for(tmp_path, fw, crawl__rate_limit_per_domain=8.0, crawl__threads=4, crawl__sources=["urls"],
                  crawl__url_list=str(lst))
    slots: list[float] = []  # the times the limiter gave out
    early: list[float] = []  # acquires that returned before their slot
    mine = threading.local()
    reserve, acquire = RateLimiter.reserve, RateLimiter.acquire

    def recording_reserve(self, host):
        mine.slot = reserve(self, host)
        slots.append(mine.slot)
        return mine.slot

    def recording_acquire(self, host, deadline=None):
        ok = acquire(self, host, deadline)
        if ok and time.monotonic() < mine.slot:
            early.append(mine.slot - time.monotonic())
        return ok

    monkeypatch.setattr(RateLimiter, "reserve", recording_reserve)
    monkeypatch.setattr(RateLimiter, "acquire", recording_acquire)
    crawl(cfg)
    times = sorted(t for t, _, p, h in fw.requests if p.startswith("/img/"))
    assert len(times) == 6
    # the limiter gives out one slot per 1/rate, never two closer, and no request leaves before its slot
    # (client side, where kd3 decides; when a thread wakes after its slot depends on the machine's load) ...
    rel = sorted(slots)
    gaps = [b - a for a, b in zip(rel, rel[1:])]
    assert len(rel) >= 6 and min(gaps) >= 1 / 8.0 - 1e-9, gaps
    assert early == [], early
    # ... and the host sees them spread over (n-1)/rate (arrival times jitter with the machine's load)
    assert times[-1] - times[0] >= 5 / 8.0 - 0.05, times


def test_slug_safety_and_original_names(tmp_path, fw, cfg_for):
    fw.add_image("x.jpg", make_jpeg(seed=1), terms=["x"])
    fw.add_image("y.jpg", make_jpeg(seed=2), terms=["猫"])
    cfg = cfg_for(tmp_path, fw, classes=["../x", "猫"])
    before = set((tmp_path).rglob("*"))
    s = crawl(cfg)
    run = RunDir(cfg.run_dir).root.resolve()
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p.resolve() in (run, run.parent) or run in p.resolve().parents for p in new)
    assert {r["class"] for r in _records(cfg)} == {"../x", "猫"}
    assert s["classes"]["猫"]["slug"] == "猫" and "/" not in s["classes"]["../x"]["slug"]
    assert s["classes"]["../x"]["downloaded"] == 1


def test_google_zero_results_message_and_fallback(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "cat", 3)
    cfg = cfg_for(tmp_path, fw, crawl__sources=["google", "bing"])
    s = crawl(cfg)
    cat = s["classes"]["cat"]
    assert GOOGLE_ZERO in cat["notes"] and cat["downloaded"] == 3
    assert {r["engine"] for r in _records(cfg)} == {"bing"}
    assert len(fw.requested_paths("/search?")) == 1  # gave up on google after one empty page


def test_google_results_when_parsable(tmp_path, fw, cfg_for, add_images):
    fw.google_results = True
    add_images(fw, "cat", 3)
    cfg = cfg_for(tmp_path, fw, crawl__sources=["google"])
    assert crawl(cfg)["classes"]["cat"]["downloaded"] == 3


def test_flickr_missing_key_is_a_clear_error(tmp_path, fw, monkeypatch, capsys):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    rc = main(["crawl", "--set", f"runs_root={tmp_path}", "--set", "classes=[cat]", "--crawl.sources", "flickr",
               "--crawl.engine_urls.flickr", fw.base_url, "--crawl.allow_private_hosts"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "crawl.flickr_api_key" in err and "FLICKR_API_KEY" in err
    assert fw.requests == [] and not (tmp_path / "default" / "crawl" / "records.jsonl").exists()


def test_flickr_with_key_and_key_never_written(tmp_path, fw, cfg_for, add_images, monkeypatch):
    add_images(fw, "cat", 2)
    monkeypatch.setenv("FLICKR_API_KEY", fw.flickr_key)
    cfg = cfg_for(tmp_path, fw, crawl__sources=["flickr"])
    assert crawl(cfg)["classes"]["cat"]["downloaded"] == 2
    for p in RunDir(cfg.run_dir).root.rglob("*"):
        if p.is_file() and p.suffix in (".jsonl", ".json", ".yaml"):
            assert fw.flickr_key not in p.read_text()
    # a wrong key: the API's message, with the setting to fix, and no key in the note
    monkeypatch.setenv("FLICKR_API_KEY", "wrong-key")
    s = crawl(cfg_for(tmp_path, fw, name="t2", crawl__sources=["flickr"]))
    note = s["classes"]["cat"]["notes"][0]
    assert "Invalid API Key" in note and "crawl.flickr_api_key" in note and "wrong-key" not in note


def test_malformed_search_page_falls_back(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "cat", 2)
    fw.malformed = {"baidu"}
    cfg = cfg_for(tmp_path, fw, crawl__sources=["baidu", "bing"])
    s = crawl(cfg)
    assert s["classes"]["cat"]["downloaded"] == 2
    assert any(n.startswith("baidu:") and "0 image URLs" in n for n in s["classes"]["cat"]["notes"])


def test_synonyms_expand_queries(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "kitty", 2)
    cfg = cfg_for(tmp_path, fw, classes=["feline"], crawl__synonyms={"feline": ["kitty"]},
                  crawl__query_templates=["{c}", "a photo of a {c}"])
    s = crawl(cfg)
    assert s["classes"]["feline"]["downloaded"] == 2
    assert {r["query"] for r in _records(cfg)} == {"kitty"}
    asked = [p for p in fw.requested_paths("/images/async") if p.endswith("first=0")]
    assert [p.split("q=")[1].split("&")[0] for p in asked] == [
        "feline", "a%20photo%20of%20a%20feline", "kitty", "a%20photo%20of%20a%20kitty"][:len(asked)]


def test_url_list_csv_and_parquet(tmp_path, fw, cfg_for, add_images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cats, dogs = add_images(fw, "cat", 2), add_images(fw, "dog", 2, seed0=50)
    csv = tmp_path / "list.csv"
    csv.write_text("link,label\n" + "".join(f"{u},cat\n" for u in cats) + "".join(f"{u},Dog\n" for u in dogs)
                   + "http://x/y.jpg,horse\n")
    cfg = cfg_for(tmp_path, fw, classes=["cat", "dog"], crawl__sources=["urls"], crawl__url_list=str(csv),
                  crawl__url_column="link", crawl__class_column="label")
    s = crawl(cfg)
    assert (s["classes"]["cat"]["downloaded"], s["classes"]["dog"]["downloaded"]) == (2, 2)
    assert all(r["engine"] == "urls" and r["query"] == "" for r in _records(cfg))
    pqf = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": cats + dogs, "class": ["cat"] * 2 + ["dog"] * 2}), pqf)
    s = crawl(cfg_for(tmp_path, fw, name="pq", classes=["cat", "dog"], crawl__sources=["urls"],
                      crawl__url_list=str(pqf)))
    assert s["total"]["downloaded"] == 4
    assert main(["crawl", "--set", f"runs_root={tmp_path}", "--set", "classes=[cat]", "--crawl.sources", "urls",
                 "--crawl.url_list", str(csv)]) == 2  # no 'url' column: a one-line error


def test_folder_source(tmp_path, fw, cfg_for):
    root = tmp_path / "imgs"
    (root / "golden_retriever").mkdir(parents=True)  # the slug of "Golden retriever"
    (root / "cat").mkdir()
    (root / "golden_retriever" / "a.jpg").write_bytes(make_jpeg(seed=1))
    (root / "golden_retriever" / "b.png").write_bytes(make_png())
    (root / "golden_retriever" / "notes.txt").write_text("not an image")
    (root / "cat" / "c.jpg").write_bytes(make_jpeg(seed=1))  # same bytes as a.jpg, another class
    cfg = cfg_for(tmp_path, fw, classes=["Golden retriever", "cat"], crawl__sources=["folder"],
                  crawl__folder=str(root))
    s = crawl(cfg)
    assert s["classes"]["Golden retriever"]["downloaded"] == 2 and s["classes"]["cat"]["downloaded"] == 1
    rows = _records(cfg)
    assert all(r["url"].startswith("file://") and r["engine"] == "folder" for r in rows)
    assert {r["error"] for r in rows if r["status"] == "error"} == {"not_image"}
    assert len([p for p in RunDir(cfg.run_dir).images.rglob("*") if p.is_file()]) == 2
    n = len(rows)
    crawl(cfg)  # nothing new on a rerun
    assert len(_records(cfg)) == n


def test_folder_source_is_taken_whole_unless_capped(tmp_path, fw, cfg_for):
    """crawl.per_class unset: a folder source gives every image (the engines' default 200 no longer caps it
    silently); set explicitly, it caps (issue 13, item 12)."""
    from pipeline.core.config import load_config

    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    for i in range(230):
        (root / "cat" / f"{i:03d}.png").write_bytes(make_png(size=(8 + i % 23, 8 + i // 23), color=(i, 3, 7)))
    base = {"name": "whole", "runs_root": str(tmp_path / "runs"), "classes": ["cat"], "crawl.sources": ["folder"],
            "crawl.folder": str(root)}
    cfg = load_config(None, base)
    assert cfg.crawl.per_class is None and cfg.crawl.target() is None
    s = crawl(cfg)
    assert s["classes"]["cat"]["downloaded"] == 230 and s["classes"]["cat"]["done"]
    assert class_done(cfg, "cat")
    capped = load_config(None, {**base, "name": "capped", "crawl.per_class": 7})
    assert crawl(capped)["classes"]["cat"]["downloaded"] == 7
    assert load_config(None, {"crawl.sources": ["bing"]}).crawl.target() == 200  # engines keep their default


def test_resume_skips_done_classes_and_tried_urls(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "cat", 4)
    add_images(fw, "dog", 6, seed0=40)
    fw.add_result(fw.err_url("404"), ["dog"])
    cfg = cfg_for(tmp_path, fw, classes=["cat", "dog"], crawl__per_class=4)
    crawl(cfg)
    assert class_done(cfg, "cat") and class_done(cfg, "dog")
    first = len(fw.requests)
    crawl(cfg)
    assert len(fw.requests) == first  # both done: not a single request
    cfg2 = cfg_for(tmp_path, fw, classes=["cat", "dog"], crawl__per_class=10)
    s = crawl_class(cfg2, "dog")
    assert s["downloaded"] == 6 and not s["done"]
    img_paths = [p for p in fw.requested_paths() if p.startswith(("/img/", "/err/"))]
    assert len(img_paths) == len(set(img_paths))  # no image URL fetched twice


def test_deadline_stops_cleanly(tmp_path, fw, cfg_for, add_images):
    add_images(fw, "cat", 6, delay_s=0.4)
    cfg = cfg_for(tmp_path, fw, crawl__threads=1, crawl__deadline_s=0.5)
    s = crawl(cfg)
    assert s["deadline_hit"] is True
    assert s["classes"]["cat"]["downloaded"] < 6
    assert json.loads((RunDir(cfg.run_dir).crawl_summary).read_text())["deadline_hit"] is True
