"""Security defaults: local-only binding, one published port with documented auth, no secret on disk
or in logs."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys

import yaml

from reliability_helpers import REPO, kd3

FLICKR_KEY = "FLICKRSECRET0123456789abcdef"
PROXY_USER, PROXY_PW = "kd3user", "Pr0xyPassw0rdXYZ"


def test_fakeweb_binds_loopback_by_default():
    from kd3demo import fakeweb
    from kd3demo.fakeweb import FakeWeb

    assert inspect.signature(FakeWeb.__init__).parameters["host"].default == "127.0.0.1"
    with FakeWeb() as w:
        assert w._server.server_address[0] == "127.0.0.1"
    src = inspect.getsource(fakeweb.main)
    assert 'add_argument("--host", default="127.0.0.1")' in src


def test_prefect_server_defaults_to_loopback():
    """The embedded/ephemeral Prefect server kd3 uses when no PREFECT_API_URL is set, and
    `prefect server start`, listen on 127.0.0.1 unless the user says otherwise; no kd3 flow code
    overrides the host."""
    from prefect.settings import PREFECT_SERVER_API_HOST

    assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"
    for p in (REPO / "flows").glob("*.py"):
        text = p.read_text()
        assert not re.search(r"0\.0\.0\.0", text), p
        assert "PREFECT_SERVER_API_HOST" not in text, p


def test_compose_publishes_only_the_ui_on_loopback_and_documents_auth():
    dc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = {name: svc["ports"] for name, svc in dc["services"].items() if svc.get("ports")}
    assert list(published) == ["prefect-server"] and len(published["prefect-server"]) == 1
    assert published["prefect-server"][0].startswith("${KD3_UI_BIND:-127.0.0.1}:4200:4200")
    assert not any(svc.get("network_mode") == "host" for svc in dc["services"].values())
    readme = (REPO / "README.md").read_text()
    assert "PREFECT_SERVER_API_AUTH_STRING" in readme and "PREFECT_SERVER_API_AUTH_STRING" in (
        REPO / "docker-compose.yml").read_text()


def test_no_secret_in_run_dir_or_logs(tmp_path):
    """A real `kd3 crawl` (DEBUG logs) with a Flickr key and a proxy URL carrying credentials, the proxy
    being the fake web itself (it answers absolute-URL proxy requests): neither secret appears in any
    file of the run directory nor in anything the process printed."""
    from kd3demo.fakeweb import FakeWeb, make_jpeg

    with FakeWeb(flickr_key=FLICKR_KEY) as fw:
        for i in range(3):
            fw.add_image(f"cat{i}.jpg", make_jpeg(seed=i), terms=["cat"])
        fw.add_result(fw.err_url("404") + f"?api_key={FLICKR_KEY}", ["cat"])  # a failing URL carrying the key
        proxy = f"http://{PROXY_USER}:{PROXY_PW}@127.0.0.1:{fw.port}"
        r = kd3("crawl", "--set", f"runs_root={tmp_path / 'runs'}", "--set", "name=sec", "--classes", "cat",
                "--crawl.sources", "flickr,bing", "--crawl.engine_urls.flickr", fw.base_url,
                "--crawl.engine_urls.bing", fw.base_url, "--crawl.allow_private_hosts", "--crawl.per_class", "3",
                "--crawl.rate_limit_per_domain", "1000", "--crawl.retries", "0",
                "--crawl.flickr_api_key", FLICKR_KEY, "--crawl.proxy", proxy, "--log-level", "DEBUG", "-vv",
                env={"NO_PROXY": "", "no_proxy": ""})
        proxied = [p for _, _, p, _ in fw.requests if p.startswith("http://")]
        keyed = [p for _, _, p, _ in fw.requests if FLICKR_KEY in p]
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert proxied, "the crawl did not go through the proxy"
    assert keyed, "the Flickr key was not used"
    run = tmp_path / "runs" / "sec"
    assert (run / "crawl" / "records.jsonl").is_file()
    out = r.stdout + r.stderr
    leaks = []
    for secret in (FLICKR_KEY, PROXY_PW):
        if secret in out:
            leaks.append(("output", secret, [ln for ln in out.splitlines() if secret in ln][:3]))
        for p in run.rglob("*"):
            if p.is_file() and secret.encode() in p.read_bytes():
                leaks.append((str(p.relative_to(run)), secret))
    assert not leaks, leaks
