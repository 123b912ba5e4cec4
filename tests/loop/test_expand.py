"""Query ranking and a round's plan for a starved class (pure functions)."""
from __future__ import annotations

from crawlers.expand import plan_class, rank_queries, smoothed_rate, split_budget, vocabulary
from pipeline.core.config import load_config
from pipeline.core.records import QueryYield


def cfg(**ov):
    base = {"crawl.sources": ["bing"], "crawl.query_templates": ["{c}"],
            "loop.query_templates": ["{c} close-up", "{c} isolated on white", "handwritten {c}"],
            "loop.explore": 2, "loop.explore_share": 0.5}
    base.update(ov)
    return load_config(None, base)


def test_ranking_prefers_selected_per_download_smoothed():
    qs = [QueryYield("bing", "two", downloaded=20, selected=4),             # 0.21
          QueryYield("bing", "handwritten two", downloaded=10, selected=8),  # 0.77
          QueryYield("bing", "two close-up", downloaded=1, selected=1),      # 0.75: one lucky download
          QueryYield("folder", "", downloaded=50, selected=50)]              # not a query: never asked again
    ranked = rank_queries(qs)
    assert [q.query for q in ranked] == ["handwritten two", "two close-up", "two"]
    assert smoothed_rate(QueryYield("bing", "x")) == 0.5  # untried: the prior


def test_first_round_explores_new_templates_and_passes_the_dry_query_on():
    c = cfg()
    plan = plan_class(c.crawl, c.loop, "two", [QueryYield("bing", "two", downloaded=8, selected=2)], 10)
    assert [(p.query, p.quota, p.base) for p in plan] == [
        ("two", 5, 8),                        # more results of the best known query (it may be dry)
        ("two close-up", 3, 0), ("two isolated on white", 2, 0),   # the first untried templates
        ("handwritten two", 0, 0),            # only what the others cannot deliver
    ]
    assert sum(p.quota for p in plan) == 10


def test_next_round_exploits_the_productive_query():
    c = cfg()
    known = [QueryYield("bing", "two", 8, selected=2), QueryYield("bing", "two close-up", 8, selected=6),
             QueryYield("bing", "two isolated on white", 6, selected=1)]
    plan = plan_class(c.crawl, c.loop, "two", known, 10)
    assert plan[0].query == "two close-up" and plan[0].quota == 5 and plan[0].base == 8
    assert plan[1].query == "handwritten two" and plan[1].quota == 5  # the one untried query left
    assert [p.query for p in plan[2:]] == ["two", "two isolated on white"] and all(p.quota == 0 for p in plan[2:])


def test_synonyms_and_the_next_source():
    c = cfg(**{"crawl.sources": ["bing", "baidu"], "crawl.synonyms": {"two": ["2"]}, "loop.query_templates": []})
    voc = vocabulary(c.crawl, c.loop, "two")
    assert voc == [("bing", "two"), ("bing", "2"), ("baidu", "two"), ("baidu", "2")]
    plan = plan_class(c.crawl, c.loop, "two", [QueryYield("bing", "two", 8, selected=4)], 9)
    # the best query on the next source is explored first, then the synonym
    assert [(p.source, p.query, p.quota) for p in plan] == [("bing", "two", 5), ("baidu", "two", 2),
                                                            ("bing", "2", 2), ("baidu", "2", 0)]


def test_nothing_known_spends_everything_on_exploration_and_split_budget():
    c = cfg(**{"loop.explore": 3})
    plan = plan_class(c.crawl, c.loop, "two", [], 10)
    assert [p.quota for p in plan] == [4, 3, 3, 0][: len(plan)] and plan[0].query == "two"
    assert split_budget(10, ["a", "b", "c"]) == {"a": 4, "b": 3, "c": 3}
    assert split_budget(10, []) == {}
