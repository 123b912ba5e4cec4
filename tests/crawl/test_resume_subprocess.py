"""A real `kd3 crawl` subprocess killed with SIGKILL mid-crawl, then resumed: nothing fetched twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kd3demo.fakeweb import make_jpeg
from crawlers.stage import crawl
from pipeline.app.cli import main
from pipeline.core.io import read_jsonl


def _kd3() -> list[str]:
    exe = Path(sys.executable).parent / "kd3"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.app.cli"]


def _image_paths(requests, start=0):
    return [p for _, _, p, _ in requests[start:] if p.startswith(("/img/", "/err/"))]


def test_kill9_mid_crawl_then_resume(tmp_path, fw, cfg_for):
    fw.add_result(fw.err_url("404"), ["cat"])
    dup = make_jpeg(seed=1)
    for i in range(16):
        fw.add_image(f"cat{i}.jpg", dup if i == 3 else make_jpeg(seed=i), terms=["cat"], delay_s=0.6)  # slow enough to be killed mid-way under load
    runs = tmp_path / "runs"
    args = ["crawl", "--set", f"runs_root={runs}", "--set", "name=killed", "--set", "classes=[cat]",
            "--crawl.sources", "bing", "--crawl.engine_urls.bing", fw.base_url, "--crawl.allow_private_hosts",
            "--crawl.per_class", "12", "--crawl.threads", "2", "--crawl.rate_limit_per_domain", "1000"]
    records = runs / "killed" / "crawl" / "records.jsonl"
    log = open(tmp_path / "kd3.log", "w")
    proc = subprocess.Popen(_kd3() + args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and proc.poll() is None:
            if records.exists() and sum(r["status"] == "ok" for r in read_jsonl(records)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "kd3.log").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = read_jsonl(records)
    n_ok_first = sum(r["status"] == "ok" for r in first)
    assert 3 <= n_ok_first < 12
    mark = len(fw.requests)
    assert main(args) == 0  # resume in-process
    second_paths = _image_paths(fw.requests, mark)
    recorded_first = {r["url"].split(fw.base_url)[1] for r in first}
    assert not recorded_first & set(second_paths)  # nothing already recorded is fetched again
    refetched = set(_image_paths(fw.requests[:mark])) & set(second_paths)
    assert len(refetched) <= 2  # at most the downloads in flight (threads) when killed
    final = read_jsonl(records)
    assert len({r["url"] for r in final}) == len(final)  # one record per URL

    # an uninterrupted crawl of the same web ends with the same counts
    clean = crawl(cfg_for(tmp_path, fw, name="clean", crawl__per_class=12, crawl__threads=2))
    killed = read_jsonl(records)
    got = Counter((r["status"], r["error"]) for r in killed)
    want = Counter((r["status"], r["error"]) for r in read_jsonl(runs / "clean" / "crawl" / "records.jsonl"))
    assert got == want and got[("ok", None)] == 12 and got[("duplicate", None)] == 1
    assert clean["classes"]["cat"]["downloaded"] == 12
    files = [p for p in (runs / "killed" / "crawl" / "images").rglob("*") if p.is_file()]
    assert len(files) == 12 and not [p for p in files if p.name.endswith(".tmp")]


def test_kd3_crawl_help_documents_every_crawl_option():
    out = subprocess.run(_kd3() + ["crawl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    from pipeline.core.config import CrawlConfig, iter_fields

    for dotted, _, _ in iter_fields(CrawlConfig, "crawl."):
        assert "--" + dotted in out.stdout, dotted
