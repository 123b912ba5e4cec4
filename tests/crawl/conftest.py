"""Fixtures for the crawl tests: a running fake web and a config pointed at it."""
from __future__ import annotations

import pytest

from kd3demo.fakeweb import FakeWeb, make_jpeg
from pipeline.core.config import load_config


@pytest.fixture
def fw():
    with FakeWeb(slow_s=5.0) as web:
        yield web


def cfg_for(tmp_path, web, classes=("cat",), name="t", **overrides):
    """A run config crawling ``web`` (private hosts allowed, no rate limit to speak of)."""
    ov = {"name": name, "runs_root": str(tmp_path / "runs"), "classes": list(classes),
          "crawl.engine_urls": web.engine_urls(), "crawl.allow_private_hosts": True,
          "crawl.rate_limit_per_domain": 1000.0, "crawl.backoff_s": 0.01, "crawl.threads": 4,
          "crawl.read_timeout_s": 2.0, "crawl.connect_timeout_s": 2.0, "crawl.max_bytes": 2_000_000,
          "crawl.sources": ["bing"], "crawl.per_class": 50}
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, ov)


def add_images(web, term, n, seed0=0, **kw):
    return [web.add_image(f"{term}{i}.jpg", make_jpeg(seed=seed0 + i), terms=[term], **kw) for i in range(n)]


@pytest.fixture(name="cfg_for")
def _cfg_for():
    return cfg_for


@pytest.fixture(name="add_images")
def _add_images():
    return add_images
