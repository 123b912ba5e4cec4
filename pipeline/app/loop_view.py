"""The crawl-selection loop in ``kd3 inspect``: per round, per class, what was kept and selected, the
yield (selected per download), and every query tried with its own yield; a terminal table per round, the
same as JSON, and a small HTML section for the report. Reads ``loop/round-NNN.json`` only."""
from __future__ import annotations

import html
import shutil
from typing import Optional

from rich.console import Console
from rich.table import Table

from pipeline.core.records import ClassYield, LoopRound, read_loop_rounds
from pipeline.core.runs import run_dir_of

# selected = mean over the distill run's last epochs; sel/dl = selected per download (the yield)
HEADERS = ["class", "kept", "+kept", "selected", "sel/kept", "sel/dl", "agree", "starved",
           "queries tried: selected/downloaded (sel/dl)"]


def _rounds(run) -> list[LoopRound]:
    rd = getattr(run, "rd", None) or run_dir_of(run)
    return read_loop_rounds(rd.loop)


def _f(v: Optional[float], pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:g}"


def _queries(y: ClassYield) -> str:
    return "; ".join(f"{q.query or '(' + q.source + ')'} {q.selected:g}/{q.downloaded} ({q.rate:.2f})"
                     for q in y.queries) or "-"


def round_rows(rnd: LoopRound) -> list[list[str]]:
    """Per class after the round: kept (and how many the round added), selected, yields, agreement, queries."""
    t = rnd.after or rnd.before
    if t is None:
        return []
    rows = []
    for c, y in t.classes.items():
        added = (rnd.added.get(c) or {}).get("kept") if rnd.round else None
        per_dl = y.selected / y.downloaded if y.downloaded else None
        rows.append([c, str(y.kept), "-" if added is None else f"{added:+d}", _f(y.selected), _f(y.ratio, True),
                     _f(None if per_dl is None else round(per_dl, 3)), _f(y.agreement, True),
                     "yes" if y.starved else "no", _queries(y)])
    return rows


def _title(rnd: LoopRound) -> str:
    t = rnd.after or rnd.before
    bits = [f"loop round {rnd.round} ({rnd.status})"]
    if t is not None:
        bits.append(f"{t.method}, starved below {t.min_selected:g} selected")
        if not t.selects:
            bits.append(f"{t.method} trains on every image: starvation from kept counts")
    if rnd.plan:
        bits.append("asked: " + ", ".join(f"{p['query']} ({p['quota']})" for ps in rnd.plan.values() for p in ps
                                          if p.get("quota")))
    if rnd.stop:
        bits.append(f"stop: {rnd.stop}")
    return " · ".join(bits)


def loop_summary(run) -> list[dict]:
    """The rounds as JSON-able dicts (``kd3 inspect --json``)."""
    return [{"round": r.round, "status": r.status, "stop": r.stop, "title": _title(r),
             "classes": [dict(zip(HEADERS, row)) for row in round_rows(r)]} for r in _rounds(run)]


def render_loop(run, console=None) -> None:
    """One terminal table per round (nothing when the run has no loop)."""
    console = console or Console(width=max(120, shutil.get_terminal_size((120, 20)).columns))
    for rnd in _rounds(run):
        t = Table(title=_title(rnd), title_justify="left", header_style="bold")
        for h in HEADERS:
            t.add_column(h, justify="left" if h in ("class", HEADERS[-1]) else "right", overflow="fold")
        for row in round_rows(rnd):
            t.add_row(*row, style="yellow" if row[7] == "yes" else None)
        console.print(t)


def loop_html(run) -> str:
    """The report's loop section ("" when the run has no loop)."""
    parts = []
    e = html.escape
    for rnd in _rounds(run):
        head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in round_rows(rnd))
        parts.append(f'<p class="note">{e(_title(rnd))}</p><table class="counts"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table>")
    return "".join(parts)

