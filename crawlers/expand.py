"""Query expansion for the crawl-selection loop: which queries a starved class asks next, and how many
downloads each gets.

A class's vocabulary is every (engine source, query) it could ask: ``crawl.query_templates`` and
``loop.query_templates`` over the class name and its ``crawl.synonyms``, on each engine of
``crawl.sources``. Queries already asked are ranked by their yield (selected images per download,
smoothed so that a query with few downloads is neither trusted nor dismissed); untried ones are explored
in vocabulary order: the new templates first, then the synonyms, then the next source with the best query.

The plan of a round gives the best query the exploitation share of the class's budget and each explored
query an equal part of ``loop.explore_share``; what a query cannot deliver (its results ran dry) passes to
the next one, the remaining known queries last.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from pipeline.core.records import QueryYield

from .source import query_sources

# the prior of the smoothed yield: a query with no downloads counts as half a selection in one download
PRIOR_SELECTED, PRIOR_DOWNLOADS = 0.5, 1.0


@dataclass
class PlannedQuery:
    """One query of a round's plan: ``quota`` new downloads (plus what earlier queries left over), counted
    above ``base``, the downloads the query had before the round."""

    source: str
    query: str
    quota: int = 0
    base: int = 0
    why: str = ""

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "PlannedQuery":
        return cls(source=row["source"], query=row["query"], quota=int(row.get("quota") or 0),
                   base=int(row.get("base") or 0), why=row.get("why") or "")


def smoothed_rate(q: QueryYield) -> float:
    return (q.selected + PRIOR_SELECTED) / (q.downloaded + PRIOR_DOWNLOADS)


def rank_queries(queries: Iterable[QueryYield]) -> list[QueryYield]:
    """Known engine queries, most productive first (ties: more selected, then name)."""
    engines = query_sources()
    known = [q for q in queries if q.source in engines and q.query]
    return sorted(known, key=lambda q: (-smoothed_rate(q), -q.selected, q.source, q.query))


def vocabulary(crawl_cfg, loop_cfg, name: str) -> list[tuple[str, str]]:
    """Every (source, query) the class may ask, in exploration order."""
    engines = [s for s in crawl_cfg.sources if s in query_sources()]
    if not engines:
        return []
    terms = [name] + [s.strip() for s in crawl_cfg.synonyms.get(name, []) if s and s.strip()]
    templates = list(dict.fromkeys(list(crawl_cfg.query_templates) + list(loop_cfg.query_templates)))
    out: list[tuple[str, str]] = []
    for term in terms:  # the class name with every template, then each synonym
        for t in templates:
            out.append((engines[0], t.replace("{c}", term)))
    for source in engines[1:]:  # the next sources, each with the first source's queries
        out.extend((source, q) for _, q in list(out[: len(terms) * len(templates)]))
    return list(dict.fromkeys(out))


def plan_class(crawl_cfg, loop_cfg, name: str, queries: list[QueryYield], budget: int) -> list[PlannedQuery]:
    """The queries class ``name`` asks this round and each one's quota (their sum is ``budget``)."""
    ranked = rank_queries(queries)
    asked = {(q.source, q.query) for q in queries}
    vocab = vocabulary(crawl_cfg, loop_cfg, name)
    untried = [sq for sq in vocab if sq not in asked]
    if ranked and len(crawl_cfg.sources) > 1:  # the next source with the best query comes before other news
        best_q = ranked[0].query
        nxt = [sq for sq in untried if sq[1] == best_q and sq[0] != ranked[0].source]
        untried = nxt[:1] + [sq for sq in untried if sq not in nxt[:1]]
    explore = untried[: loop_cfg.explore]
    explore_budget = int(round(budget * loop_cfg.explore_share)) if explore else 0
    if not ranked:
        explore_budget = budget
    plan: list[PlannedQuery] = []
    if ranked:
        best = ranked[0]
        plan.append(PlannedQuery(best.source, best.query, budget - explore_budget, best.downloaded,
                                 f"best yield {best.rate:.2f}"))
    for i, (source, query) in enumerate(explore):
        share = explore_budget // len(explore) + (1 if i < explore_budget % len(explore) else 0)
        plan.append(PlannedQuery(source, query, share, 0, "new"))
    for q in ranked[1:]:
        plan.append(PlannedQuery(q.source, q.query, 0, q.downloaded, f"yield {q.rate:.2f}"))
    for source, query in untried[len(explore):]:
        plan.append(PlannedQuery(source, query, 0, 0, "new, if the others run dry"))
    return plan


def split_budget(budget: int, classes: list[str]) -> dict[str, int]:
    """``budget`` shared equally by ``classes`` (the first ones take the remainder)."""
    if not classes:
        return {}
    return {c: budget // len(classes) + (1 if i < budget % len(classes) else 0) for i, c in enumerate(classes)}
