"""Fixtures for the curate tests (helpers live in curate_fixtures.py, importable by the tests)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from curate_fixtures import build_world, make_cfg, real_images  # noqa: E402

@pytest.fixture(scope="session")
def images():
    return real_images()


@pytest.fixture
def world(tmp_path):
    return build_world(tmp_path)


@pytest.fixture(scope="session")
def curated(tmp_path_factory):
    """One full curate run shared by the read-only tests."""
    from pipeline.curate import curate

    w = build_world(tmp_path_factory.mktemp("curated"))
    cfg = make_cfg(w["run"], shard_max_samples=4)
    w["manifest"] = curate(cfg)
    w["cfg"] = cfg
    return w
