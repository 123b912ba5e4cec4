"""Fixtures for tests/reliability (helpers live in reliability_helpers.py, importable by the tests)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from reliability_helpers import load_module  # noqa: E402


@pytest.fixture
def fw():
    from kd3demo.fakeweb import FakeWeb

    with FakeWeb(slow_s=5.0) as web:
        yield web


@pytest.fixture
def crawl_helpers():
    """tests/crawl/conftest.py: cfg_for(tmp_path, web, ...) and add_images(web, term, n)."""
    return load_module("tests/crawl/conftest.py", "kd3_crawl_conftest")
