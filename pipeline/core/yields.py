"""Per query class yield of a distill run: what each class's crawl turned into, down to what the method
trained on. Read from the run directory only (records, decisions, the distill run's pool keys, selection
log and metrics), so the crawl-selection loop, ``kd3 inspect`` and a flow all see the same numbers.

A sample's *query class* is the class whose crawl found it (``.cls`` in the shards, ``class`` in the
records and decisions), not the teacher's label for it. Every kept image is credited to the query that
downloaded it first for its class (the record with ``status: ok``).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .records import ClassYield, QueryYield, YieldTable, read_decisions, read_metrics, read_pool_keys, \
    read_records, read_selection
from .runs import RunDir


def _origins(run: RunDir) -> tuple[dict[tuple[str, str], tuple[str, str]], dict[tuple[str, str, str], int]]:
    """(class, sha256) -> (source, query) of the download, and downloads per (class, source, query)."""
    origin: dict[tuple[str, str], tuple[str, str]] = {}
    downloads: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in read_records(run.records) if run.records.exists() else []:
        if r.status == "ok" and r.sha256:
            origin.setdefault((r.cls, r.sha256), (r.engine, r.query))
            downloads[(r.cls, r.engine, r.query)] += 1
    return origin, downloads


def selected_fraction(method_dir: Path, last_epochs: int) -> tuple[dict[str, float], bool, list[int]]:
    """Per pool key, the share of the last ``last_epochs`` epochs that selected it; whether the method
    selects (False: every row is "all"); the epochs read."""
    method_dir = Path(method_dir)
    pool = read_pool_keys(method_dir / "pool_keys.txt")
    rows = read_selection(method_dir / "selection.jsonl")[-last_epochs:]
    counts: dict[str, float] = {k: 0.0 for k in pool}
    for row in rows:
        for k in row.keys(pool, method_dir):
            if k in counts:
                counts[k] += 1.0 / len(rows)
    return counts, any(r.selects for r in rows), [r.epoch for r in rows]


def min_selected_of(selected: dict[str, float], min_selected: Optional[float], fraction: float) -> float:
    """The starvation line: ``min_selected`` when given, else ``fraction`` x the median class."""
    if min_selected is not None:
        return float(min_selected)
    return fraction * statistics.median(selected.values()) if selected else 0.0


def yield_table(run_dir: Path, method_dir: Path, classes: list[str], *, last_epochs: int = 3,
                min_selected: Optional[float] = None, starved_fraction: float = 0.5) -> YieldTable:
    """The yield of the distill run in ``method_dir`` per query class, with its starved classes."""
    run, method_dir = RunDir(run_dir), Path(method_dir)
    metrics = read_metrics(method_dir / "metrics.json")
    sel, selects, epochs = selected_fraction(method_dir, last_epochs)
    origin, downloads = _origins(run)
    table = {c: ClassYield() for c in classes}
    queries: dict[str, dict[tuple[str, str], QueryYield]] = {c: {} for c in classes}
    for (cls, source, query), n in downloads.items():
        if cls in table:
            table[cls].downloaded += n
            queries[cls][(source, query)] = QueryYield(source, query, downloaded=n)
    for d in read_decisions(run.decisions) if run.decisions.exists() else []:
        if not d.kept or d.cls not in table:
            continue
        src = origin.get((d.cls, d.id), ("", ""))
        q = queries[d.cls].setdefault(src, QueryYield(*src))
        y = table[d.cls]
        y.kept += 1
        q.kept += 1
        if d.key in sel:
            y.pool += 1
            y.selected += sel[d.key]
            q.selected += sel[d.key]
    agreement = (metrics.get("final") or {}).get("val_agreement_per_class") or {}
    # kd trains on every pool image: its "selected" is the pool, so starvation reads the pool counts
    line = min_selected_of({c: y.selected for c, y in table.items()}, min_selected, starved_fraction)
    for c, y in table.items():
        y.selected = round(y.selected, 3)
        y.agreement = agreement.get(c)
        y.starved = y.selected < line
        y.queries = sorted(queries[c].values(), key=lambda q: (-q.rate, q.source, q.query))
        for q in y.queries:
            q.selected = round(q.selected, 3)
    return YieldTable(method=str(metrics.get("method") or method_dir.name.split("-", 1)[0]),
                      method_dir=str(method_dir), selects=selects, epochs=epochs, min_selected=round(line, 3),
                      classes=table)


def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else (f"{v:.1f}" if v != int(v) else str(int(v)))


def top_queries(y: ClassYield, n: int = 3) -> str:
    """``query (source) selected/downloaded`` of the class's best queries."""
    return "; ".join(f"{q.query or '-'} ({q.source}) {_fmt(q.selected)}/{q.downloaded}" for q in y.queries[:n]) or "-"


COMPARE_HEADERS = ["class", "kept", "selected", "sel/kept", "agreement", "starved", "queries (selected/downloaded)"]


def compare_rows(before: Optional[YieldTable], after: Optional[YieldTable]) -> list[list[str]]:
    """Per class ``before -> after`` cells (the loop's artifact, ``kd3 inspect`` and the bench print them)."""
    classes = list((after or before).classes) if (after or before) else []
    rows = []
    for c in classes:
        b = before.classes.get(c) if before else None
        a = after.classes.get(c) if after else None

        def cell(get, pct=False):
            vb, va = (None if b is None else get(b)), (None if a is None else get(a))
            if b is None:
                return _fmt(va, pct)
            return f"{_fmt(vb, pct)} -> {_fmt(va, pct)}" if a is not None else _fmt(vb, pct)

        starved = ("yes" if b.starved else "no") if b is not None else "-"
        if a is not None:
            starved = (starved + " -> " if b is not None else "") + ("yes" if a.starved else "no")
        rows.append([c, cell(lambda y: y.kept), cell(lambda y: y.selected), cell(lambda y: y.ratio, True),
                     cell(lambda y: y.agreement, True), starved, top_queries(a or b)])
    return rows
