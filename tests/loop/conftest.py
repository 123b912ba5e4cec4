"""Loop tests: a tiny query world of three classes (``two`` is rare on the web and mostly junk under its
plain query) served by the fake web under exact queries, the flows tests' random cnn_tiny teacher, and a
config maker.

With a random teacher kd3 selects nothing, so the loop tests that need starved classes use kd (it trains
on every image: starvation from kept counts) or an explicit ``loop.min_selected``."""
from __future__ import annotations

import os

import pytest
from testlib import TESTS, load_module

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

CLASSES = ["zero", "one", "two"]
TEMPLATES = ["{c} close-up", "{c} isolated on white", "handwritten {c}"]


@pytest.fixture(scope="session")
def loop_pool():
    from kd3demo import world as dw

    spec = dw.WorldSpec(seed=1, n_per_class=20, junk_fraction=0.5, dup_fraction=0.0, n_broken=0,
                        train_per_class=4, query_world="loop")
    return [p for p in dw.make_web_pool(spec) if set(p.query.split()) & set(CLASSES)]


@pytest.fixture(scope="session")
def loop_web(loop_pool):
    from kd3demo import world as dw
    from kd3demo.fakeweb import FakeWeb

    with FakeWeb() as web:
        dw.register_on_fakeweb(web, loop_pool, exact=True)
        yield web


def _flows_conftest():
    """tests/flows/conftest.py, whose random cnn_tiny teacher of the same three classes is reused here."""
    mod = load_module(TESTS / "flows" / "conftest.py", "kd3_flows_conftest")
    assert mod.CLASSES == CLASSES
    return mod


tiny_teacher = _flows_conftest().tiny_teacher


@pytest.fixture
def loop_cfg(tmp_path, loop_web, tiny_teacher):
    from pipeline.core.config import load_config

    def make(name: str = "loop", **overrides):
        ov = {
            "name": name, "runs_root": str(tmp_path / "runs"), "classes": CLASSES, "teacher": str(tiny_teacher),
            "crawl.sources": ["bing"], "crawl.engine_urls.bing": loop_web.base_url, "crawl.allow_private_hosts": True,
            "crawl.per_class": 40, "crawl.query_templates": ["{c}"], "crawl.threads": 2,
            "crawl.rate_limit_per_domain": 1000.0, "crawl.retries": 0,
            "curate.embed_backend": "teacher", "curate.device": "cpu", "curate.workers": 0, "curate.min_side": 24,
            "curate.phash_threshold": 0, "curate.near_dup_threshold": 1.0,
            "distill.method": "kd", "distill.student": "cnn_tiny", "distill.epochs": 1, "distill.batch_size": 16,
            "distill.workers": 0, "distill.device": "cpu", "distill.val_fraction": 0.2,
            "loop.rounds": 2, "loop.budget_per_round": 8, "loop.last_epochs": 1, "loop.query_templates": TEMPLATES,
            "flow.crawl_concurrency": 1, "flow.crawl_retries": 0,
        }
        ov.update(overrides)
        return load_config(None, ov)

    return make
