"""The demo world served by the fake web, and crawled by the real Bing source."""
import pytest
import requests

from kd3demo import world as dw

fakeweb = pytest.importorskip("kd3demo.fakeweb")

SPEC = dw.WorldSpec(seed=1, n_per_class=4, junk_fraction=1.25, dup_fraction=0.5, n_broken=2, train_per_class=4)


@pytest.fixture(scope="module")
def pool():
    return dw.make_web_pool(SPEC)


def test_every_query_finds_its_images_and_only_those(pool):
    with fakeweb.FakeWeb() as web:
        urls = dw.register_on_fakeweb(web, pool)
        assert len(set(urls.values())) == len(pool)
        for cls in dw.DIGIT_NAMES:
            found = {u for u, _ in web.search(cls)}
            expect = {urls[p.name] for p in pool if p.query == cls}
            assert found == expect
            # junk is listed under the query like everything else: the pipeline cannot tell
            assert any(urls[p.name] in found for p in pool if p.query == cls and p.kind in dw.JUNK_KINDS)
        for p in pool[:15]:
            r = requests.get(urls[p.name], timeout=5)
            assert r.status_code == 200 and r.content == p.data
            assert r.headers["Content-Type"] == p.content_type
            # nothing in the URL or the result title says what the image is
            assert p.kind not in urls[p.name] and (p.truth or "zzz") not in urls[p.name]


def test_crawled_by_the_bing_source_same_path_as_a_real_crawl(pool, tmp_path):
    stage = pytest.importorskip("crawlers.stage")
    from pipeline.core.config import load_config
    from pipeline.core.io import read_jsonl

    per_query = max(sum(v.values()) for v in dw.composition(pool).values())
    truth = dw.truth_by_sha([p.truth_row() for p in pool])
    with fakeweb.FakeWeb() as web:
        dw.register_on_fakeweb(web, pool)
        cfg = load_config(None, {
            "name": "w", "runs_root": str(tmp_path), "classes": list(dw.DIGIT_NAMES),
            "crawl.sources": ["bing"], "crawl.engine_urls.bing": web.engine_urls()["bing"],
            "crawl.allow_private_hosts": True, "crawl.per_class": per_query, "crawl.query_templates": ["{c}"],
            "crawl.threads": 2, "crawl.rate_limit_per_domain": 1000.0, "crawl.retries": 0,
        })
        stage.crawl(cfg, classes=["three", "seven"])
        assert any(path.startswith("/images/async") for path in web.requested_paths())  # Bing's endpoint
    recs = read_jsonl(tmp_path / "w" / "crawl" / "records.jsonl")
    assert {r["class"] for r in recs} == {"three", "seven"}
    for cls in ("three", "seven"):
        mine = [p for p in pool if p.query == cls]
        ok = {r["sha256"] for r in recs if r["class"] == cls and r["status"] == "ok"}
        good = {p.sha256 for p in mine if not p.kind.startswith("broken")}
        assert ok == good  # every decodable file once (exact duplicates collapse), nothing from elsewhere
        assert all(truth[s]["query"] == cls for s in ok)
        # the junk under the query was crawled like the digits: only the side file knows
        assert any(truth[s]["kind"] in dw.JUNK_KINDS for s in ok)
        assert any(r["status"] == "error" for r in recs if r["class"] == cls)  # the broken files
