"""The demo's query world: each query answers its own mix; the one-query world is untouched."""
from __future__ import annotations

from collections import Counter

import pytest

from kd3demo import world as dw
from kd3demo.fakeweb import FakeWeb

BASE = dict(seed=2, n_per_class=20, junk_fraction=0.5, dup_fraction=0.2, n_broken=2, train_per_class=4)


@pytest.fixture(scope="module")
def pools():
    return dw.make_web_pool(dw.WorldSpec(**BASE)), dw.make_web_pool(dw.WorldSpec(**BASE, query_world="loop"))


@pytest.mark.parametrize("name", sorted(dw.QUERY_WORLDS))
def test_plain_queries_come_from_the_one_query_worlds_streams(name):
    plain = dw.make_web_pool(dw.WorldSpec(**BASE))
    qw = dw.make_web_pool(dw.WorldSpec(**BASE, query_world=name))
    starved = dw.QUERY_WORLDS[name]["starved"]
    for cls in dw.DIGIT_NAMES:
        # a digit of a rare class listed as another class's junk is drawn as the next class's instead
        # (and so are its copies): compare the rest byte for byte
        moved = {p.name for p in plain if p.truth in starved}
        a = [(p.name, None if p.name in moved else p.data) for p in plain if p.query == cls]
        b = [(p.name, None if p.name in moved else p.data) for p in qw if p.query == cls]
        if cls in starved:  # fewer files, mostly junk, drawn from the same streams
            kinds = Counter(p.kind for p in qw if p.query == cls)
            assert kinds["digit"] == 1 and sum(kinds[k] for k in dw.JUNK_KINDS) == 6
            digits_a = {p.data for p in plain if p.query == cls and p.kind == "digit"}
            assert {p.data for p in qw if p.query == cls and p.kind == "digit"} <= digits_a
        else:
            assert a == b  # byte for byte the one-query world's answer
    # the rare classes' digits turn up nowhere but under their own queries
    assert all(p.query.split()[-1] in starved or p.query.split()[0] in starved
               for p in qw if p.truth in starved)


def test_each_query_answers_its_mix_under_exact_queries(pools):
    _, qw = pools
    with FakeWeb() as web:
        urls = dw.register_on_fakeweb(web, qw, exact=True)
        for q in ("two", "handwritten two", "two close-up", "two isolated on white"):
            found = {u for u, _ in web.search(q)}
            assert found == {urls[p.name] for p in qw if p.query == q} and found
        assert web.search("two photo") == [] and web.search("  Handwritten   TWO ") != []
    hand = [p for p in qw if p.query == "handwritten two" and p.kind == "digit"]
    assert len(hand) == 20 and all(p.params["background"] == "scan" for p in hand)
    assert all(p.params.get("background") != "scan" for p in qw if p.query == "two isolated on white"
               and p.kind == "digit")


def test_world_json_of_a_world_without_the_option_has_no_new_key(tmp_path):
    from pipeline.core.io import read_json

    spec = dw.spec_for("tiny", seed=0, n_per_class=2, train_per_class=2)
    dw.generate_world(tmp_path / "w", spec)
    assert "query_world" not in read_json(tmp_path / "w" / "world.json")["spec"]
    assert dw.generate_world(tmp_path / "w", spec).spec == spec  # reused as is
    with pytest.raises(Exception, match="query_world"):
        dw.WorldSpec(query_world="nope")
