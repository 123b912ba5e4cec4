"""The demo world served by the fake web, and crawled by the real Bing source."""
import pytest
import requests

from pipeline import demo_world as dw

fakeweb = pytest.importorskip("crawlers.fakeweb")

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
