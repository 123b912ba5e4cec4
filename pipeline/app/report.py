"""The static HTML report ``runs/<name>/report/index.html``.

One self-contained page that opens from disk: inline CSS, charts drawn with matplotlib and embedded as
inline SVG (:mod:`.charts`), thumbnails as JPEG files under ``report/thumbs/`` (linked to the original
image), no script and no network resource. Sections: stage funnel, per-class counts, a contact sheet
per class (kept, then dropped grouped by reason), duplicate groups side by side, class-score histograms
(CLIP scores, or the teacher's confidence when the run was embedded with the teacher), and for the
distill runs: every run side by side, then per run the selected images per class and epoch (counted by
the label the method counts them by), accuracy per epoch, the student's confusion matrix on the eval set
and the images KD³ never selected. Partial runs get the sections they have data for and a list of what
is missing.
"""
from __future__ import annotations

import datetime as _dt
import html
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

from pipeline.core.io import atomic_write_text
from pipeline.core.records import CrawlRecord, Decision, DropReason

from . import charts
from .inspect import Run, fmt_bytes, size_cells, summarize
from .loop_view import loop_html
from .sheets import save_jpeg, thumbnail

log = logging.getLogger("kd3.inspect")

PALETTE = ["#2563eb", "#db2777", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#dc2626",
           "#4f46e5", "#059669", "#9333ea", "#0d9488"]
THUMB = 176

e = html.escape


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------- thumbnails

class Thumbs:
    """Writes one JPEG thumbnail per image into report/thumbs/ (reused across reruns)."""

    def __init__(self, run: Run, out_dir: Path, size: int = THUMB):
        self.run, self.dir, self.size = run, out_dir / "thumbs", size
        self.report_dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def src(self, row: Union[Decision, CrawlRecord]) -> str:
        """Relative URL of the thumbnail of a decision or record row (created if needed)."""
        ident = (_ident(row) or "unknown")[:20]
        out = self.dir / f"{ident}.jpg"
        if not out.is_file():
            path = self.run.image_file(row)
            save_jpeg(thumbnail(path, self.size, square=False) if path else thumbnail(None, self.size), out,
                      quality=82)
            self.written += 1
        return f"thumbs/{out.name}"

    def href(self, row: Union[Decision, CrawlRecord]) -> Optional[str]:
        path = self.run.image_file(row)
        if path is None:
            return None
        return Path(os.path.relpath(path, self.report_dir)).as_posix()


def _ident(row: Union[Decision, CrawlRecord]) -> Optional[str]:
    return row.id if isinstance(row, Decision) else row.sha256


def _tile(th: Thumbs, row: Union[Decision, CrawlRecord], caption: str = "", sub: str = "", badge: str = "",
          badge_color: str = "", title: str = "") -> str:
    src = th.src(row)
    href = th.href(row)
    alt = caption or (row.id[:16] if isinstance(row, Decision) else "")
    img = f'<img src="{e(src)}" alt="{e(alt)}" loading="eager">'
    if href:
        img = f'<a href="{e(href)}">{img}</a>'
    b = (f'<span class="badge" style="background:{badge_color}">{e(badge)}</span>' if badge else "")
    tip = title or " · ".join(x for x in (row.url or "", getattr(row, "detail", "") or "") if x)
    return (f'<figure class="tile" title="{e(tip)}">{img}{b}'
            f'<figcaption><span>{e(caption)}</span><small>{e(sub)}</small></figcaption></figure>')


def _grid(tiles: Sequence[str], more: int = 0, empty: str = "nothing here") -> str:
    if not tiles:
        return f'<p class="empty">{e(empty)}</p>'
    tail = f'<p class="more">… and {more} more not shown</p>' if more > 0 else ""
    return f'<div class="grid">{"".join(tiles)}</div>{tail}'


# ---------------------------------------------------------------- sections

def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _n(v) -> str:
    return "–" if v is None else str(v)


def _section_overview(s: dict) -> str:
    t = s["totals"]
    cards = [("URLs tried", _n(t.get("crawled"))), ("downloaded", _n(t.get("downloaded"))),
             ("kept", _n(t.get("kept"))), ("in shards", fmt_bytes(t.get("bytes")) if t.get("bytes") is not None else "–"),
             ("classes", str(len(s["classes"])))]
    best = max((d for d in s["distill"] if d.get("top1") is not None), key=lambda d: d["top1"], default=None)
    if best:
        cards.append((f"best student top-1 ({best['method']})", _pct(best["top1"])))
    body = "".join(f'<div class="card"><div class="big">{e(v)}</div><div class="cap">{e(k)}</div></div>'
                   for k, v in cards)
    return f'<div class="cards">{body}</div>'


def _section_counts(s: dict) -> str:
    cols = [("crawled", "crawled"), ("downloaded", "downloaded"), ("valid", "valid"),
            ("exact_dup", "exact"), ("phash_dup", "pHash"), ("near_dup", "near"),
            ("cross_class_dup", "x-class"), ("contaminated", "contam."), ("off_class", "off-class"),
            ("kept", "kept"), ("shards", "shards"), ("bytes", "bytes")]
    head = "".join(f"<th>{e(label)}</th>" for _, label in cols)
    rows = []
    for i, c in enumerate(s["classes"]):
        r = s["per_class"][c]
        cells = []
        for k, _ in cols:
            v = r[k]
            txt = fmt_bytes(v) if k == "bytes" and v is not None else _n(v)
            cls = ' class="z"' if v == 0 else (' class="kept"' if k == "kept" else "")
            cells.append(f"<td{cls}>{e(txt)}</td>")
        rate = (r["kept"] / r["downloaded"]) if r.get("kept") is not None and r.get("downloaded") else None
        bar = (f'<div class="rate"><div style="width:{100 * rate:.0f}%;background:{_color(i)}"></div></div>'
               f'<small>{_pct(rate)}</small>') if rate is not None else "–"
        rows.append(f'<tr><th scope="row"><i class="dot" style="background:{_color(i)}"></i>'
                    f'<a href="#class-{i}">{e(c)}</a></th>{"".join(cells)}<td class="ratecell">{bar}</td></tr>')
    t = s["totals"]
    foot = "".join(f"<td>{e(fmt_bytes(t.get(k)) if k == 'bytes' and t.get(k) is not None else _n(t.get(k)))}</td>"
                   for k, _ in cols)
    group = ('<tr class="group"><th colspan="4"></th><th colspan="4" class="grp">duplicates</th>'
             f'<th colspan="{len(cols) - 6}"></th></tr>')
    return (f'<div class="tablewrap"><table class="counts"><thead>{group}<tr><th>class</th>{head}<th>keep rate</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody><tfoot><tr><th>total</th>{foot}<td></td></tr></tfoot>'
            f'</table></div>')


class _Seen:
    """What the report shows of the decisions, gathered in one pass over them (a pool's 10^6 rows are never
    all held): per class the first kept images and the first dropped ones of each reason, with their counts;
    the size of every duplicate group; each image's score for its own class (CLIP's where the run has CLIP
    scores, else the teacher's confidence)."""

    def __init__(self, run: Run, classes: list[str], max_kept: int, max_dropped: int):
        self.kept: dict[str, list[Decision]] = defaultdict(list)
        self.n_kept: Counter = Counter()
        self.dropped: dict[tuple, list[Decision]] = defaultdict(list)   # (class, reason) -> the first ones
        self.n_reason: Counter = Counter()                               # (class, reason) -> how many
        self.n_dropped: Counter = Counter()
        self.dup_sizes: Counter = Counter()                              # dup_of -> members, first seen first
        # score per own class, kept / dropped, for rows with CLIP scores (True) and without (False)
        self._vals = {b: {c: ([], []) for c in classes} for b in (True, False)}
        self._off = {b: Counter() for b in (True, False)}
        self.clip = False
        for d in run.each_decision():
            self._add(d, classes, max_kept, max_dropped)

    def _add(self, d: Decision, classes: list[str], max_kept: int, max_dropped: int) -> None:
        if d.kept:
            self.n_kept[d.cls] += 1
            if len(self.kept[d.cls]) < max_kept:
                self.kept[d.cls].append(d)
        else:
            self.n_dropped[d.cls] += 1
            self.n_reason[d.cls, d.reason] += 1
            if len(self.dropped[d.cls, d.reason]) < max_dropped:
                self.dropped[d.cls, d.reason].append(d)
        if d.dup_of and d.reason is not None and d.reason.group == "duplicate":
            self.dup_sizes[d.dup_of] += 1
        has_clip = bool(d.clip_scores)
        self.clip = self.clip or has_clip
        v = _own_class_score(d, classes)
        if v is not None and d.cls in self._vals[has_clip]:
            self._vals[has_clip][d.cls][0 if d.kept else 1].append(v)
            if d.clip_top and d.clip_top != d.cls:
                self._off[has_clip][d.cls] += 1

    @property
    def any(self) -> bool:
        return bool(self.n_kept or self.n_dropped)

    def has(self, cls: str) -> bool:
        return bool(self.n_kept[cls] or self.n_dropped[cls])

    @property
    def vals(self) -> dict[str, tuple[list[float], list[float]]]:
        return self._vals[self.clip]

    @property
    def off(self) -> Counter:
        return self._off[self.clip]


def _dropped_html(th: Thumbs, r: dict, seen: _Seen, cls: str, max_dropped: int) -> str:
    """A class's dropped images, grouped by reason (report order = DropReason order)."""
    present = [rz for rz in DropReason if r.get(rz.value)]
    parts = [f'<details class="dropped" open><summary>dropped <span class="count">{seen.n_dropped[cls]}</span> '
             + " ".join(f'<span class="pill" style="background:{rz.color}">{e(rz.label)} {r.get(rz.value) or 0}</span>'
                        for rz in present) + "</summary>", '<div class="reasons">']
    for rz in DropReason:
        group, n = seen.dropped.get((cls, rz), []), seen.n_reason[cls, rz]
        if not n:
            continue
        more = n - max_dropped
        parts.append(f'<div class="reasongroup" style="border-top-color:{rz.color}">'
                     f'<h5><span class="pill" style="background:{rz.color}">{e(rz.label)}</span> {n}</h5>'
                     f'<div class="row">' + "".join(_tile(th, d, d.detail or rz.value, d.id[:16])
                                                    for d in group[:max_dropped])
                     + "</div>" + (f'<p class="more">… and {more} more</p>' if more > 0 else "") + "</div>")
    parts.append("</div></details>")
    return "".join(parts)


def _section_classes(run: Run, s: dict, th: Thumbs, seen: _Seen, max_kept: int, max_dropped: int) -> str:
    out = []
    for i, c in enumerate(s["classes"]):
        parts = [f'<section class="cls" id="class-{i}"><h3><i class="dot" style="background:{_color(i)}"></i>'
                 f'{e(c)}</h3>']
        if seen.has(c):
            kept, n_kept = seen.kept.get(c, []), seen.n_kept[c]
            parts.append(f'<h4>kept <span class="count">{n_kept}</span></h4>')
            tiles = [_tile(th, d, d.key or d.id[:16], f'{d.w}×{d.h}'
                           + (f' · {d.teacher_conf:.2f}' if isinstance(d.teacher_conf, (int, float)) else ""))
                     for d in kept[:max_kept]]
            parts.append(_grid(tiles, n_kept - max_kept, "no image kept for this class"))
            if seen.n_dropped[c]:
                parts.append(_dropped_html(th, s["per_class"][c], seen, c, max_dropped))
        else:
            recs, n = [], 0
            for x in run.each_record():
                if x.cls == c and x.status == "ok":
                    n += 1
                    if len(recs) < max_kept:
                        recs.append(x)
            parts.append(f'<h4>downloaded <span class="count">{n}</span> <small>(not curated yet)</small></h4>')
            parts.append(_grid([_tile(th, x, (x.sha256 or "")[:16], f'{x.w}×{x.h} · {x.engine}', title=x.url or "")
                                for x in recs], n - max_kept, "nothing downloaded for this class"))
        parts.append("</section>")
        out.append("".join(parts))
    return "".join(out)


def _section_dups(run: Run, th: Thumbs, seen: _Seen, max_groups: int) -> str:
    if not seen.dup_sizes:
        return '<p class="empty">no duplicate groups</p>'
    top = [orig for orig, _ in sorted(seen.dup_sizes.items(), key=lambda kv: -kv[1])[:max_groups]]
    members: dict[str, list[Decision]] = {o: [] for o in top}
    kept_orig: dict[str, Decision] = {}
    first_orig: dict[str, Decision] = {}
    for d in run.each_decision():  # a second pass: the members of the largest groups and their originals
        if d.dup_of in members and d.reason is not None and d.reason.group == "duplicate":
            members[d.dup_of].append(d)
        if d.id in members:
            first_orig.setdefault(d.id, d)
            if d.kept:
                kept_orig.setdefault(d.id, d)
    rows = []
    for orig_id in top:
        orig = kept_orig.get(orig_id) or first_orig.get(orig_id)
        cells = []
        if orig is not None:
            state = "kept" if orig.kept else (orig.reason.value if orig.reason else None)
            cells.append(_tile(th, orig, f'{orig.cls} · {state}', orig_id[:16], badge="kept",
                               badge_color="#16a34a"))
        for d in members[orig_id]:
            cells.append(_tile(th, d, f'{d.cls} · {d.detail or ""}', d.id[:16], badge=d.reason.label,
                               badge_color=d.reason.color))
        rows.append(f'<div class="dupgroup">{"".join(cells)}</div>')
    more = len(seen.dup_sizes) - max_groups
    tail = f'<p class="more">… and {more} more groups</p>' if more > 0 else ""
    return f'<div class="dups">{"".join(rows)}</div>' + tail


def _own_class_score(d: Decision, classes: list[str]) -> Optional[float]:
    """The image's score for its own (query) class: its CLIP score, else the teacher's confidence."""
    if d.clip_scores:
        li = d.label if isinstance(d.label, int) and 0 <= d.label < len(d.clip_scores) else (
            classes.index(d.cls) if d.cls in classes and classes.index(d.cls) < len(d.clip_scores) else None)
        return None if li is None else float(d.clip_scores[li])
    return float(d.teacher_conf) if isinstance(d.teacher_conf, (int, float)) else None


def _section_scores(seen: _Seen) -> tuple[str, str]:
    """(heading, body): per class, kept vs dropped histograms of CLIP class scores, or of the teacher's
    confidence in the query class when the run was embedded without CLIP."""
    clip, vals, off = seen.clip, seen.vals, seen.off
    heading = "CLIP class scores" if clip else "Teacher confidence"
    allv = [v for k, dr in vals.values() for v in (*k, *dr)]
    if not allv:
        return heading, '<p class="empty">no CLIP scores and no teacher confidences in the decisions</p>'
    lo, hi = (0.0, 1.0) if min(allv) >= 0 and max(allv) <= 1 else (min(allv), max(allv))
    panels = [(f"{c}\n{len(k)} kept · {len(dr)} dropped" + (f" · top elsewhere {off[c]}" if clip else ""),
               _color(i), k, dr) for i, (c, (k, dr)) in enumerate(vals.items()) if k or dr]
    what = ("each image's CLIP score for its own class" if clip else
            "the teacher's confidence that each image shows its query class (no CLIP scores: embedded with the "
            "teacher)")
    return heading, (f'<p class="note">{e(what)}; kept (green) and dropped (red)</p><div class="panel">'
                     f'{charts.histograms(panels, xlabel="CLIP score" if clip else "teacher confidence", lo=lo, hi=hi)}'
                     f'</div>')


def _section_compare(s: dict) -> str:
    """Every distill run of the run side by side: a table and a bar chart of the headline numbers."""
    runs = s["distill"]
    cols = ("run", "method", "student", "epochs", "student top-1", "teacher top-1", "agreement", "selected",
            "params", "MFLOPs", "CPU ms b1/b64", "evaluated on")
    rows = []
    for d in runs:
        cells = [d["name"], d["method"], d["student"], d["epochs"], _pct(d["top1"]), _pct(d["teacher_top1"]),
                 _pct(d["agreement"]), _pct(d["selected_fraction"]), *size_cells(d), d.get("eval") or "–"]
        rows.append("<tr>" + "".join(f"<td>{e(_n(x) if not isinstance(x, str) else x)}</td>" for x in cells)
                    + "</tr>")
    table = (f'<div class="tablewrap"><table class="counts compare"><thead><tr>'
             f'{"".join(f"<th>{e(c)}</th>" for c in cols)}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    chart = charts.runs_compared([d["name"] for d in runs], {
        "student top-1": [d["top1"] for d in runs], "teacher top-1": [d["teacher_top1"] for d in runs],
        "agreement": [d["agreement"] for d in runs], "selected (last epoch)": [d["selected_fraction"] for d in runs]})
    return (f'<h3>every distill run of this run, side by side</h3>{table}<div class="panel">{chart}</div>')


def _selection_chart(dr, ds: dict, classes: list[str]) -> str:
    """Selected images per class and epoch, as counts by the label the method counts them by."""
    sel_src = [(ep.get("epoch", j), ep.get("selected_per_class") or {}) for j, ep in enumerate(dr.epochs)]
    if not any(v for _, v in sel_src) and dr.selection:
        sel_src = [(row.epoch, row.selected_per_class) for row in dr.selection]
    series = [(c, _color(i), [(float(ep), float(v[c])) for ep, v in sel_src if c in v]) for i, c in enumerate(classes)]
    last = ", ".join(f'{c} {ds["selected_last"][c]}/{ds["selected_of"][c]}' for c in classes
                     if ds["selected_last"].get(c) is not None)
    note = (f'<p class="note">counted by {e(ds["selection_by"])}; last epoch, selected/of the pool images with that '
            f'label: {e(last)}</p>' if last else "")
    return (f'<div><h4>selected per epoch, by {e(ds["selection_by"])}</h4>'
            f'{charts.lines(series, ylabel="selected images")}{note}</div>')


def _never_selected(run: Run, dr, th: Thumbs, max_unselected: int) -> str:
    pool = run.pool_keys
    chosen = dr.selected_keys(pool)
    never = [k for k in pool if k not in chosen]
    shown = set(never[:max_unselected])
    rows = {d.key: d for d in run.each_decision() if d.key in shown}
    tiles = []
    for k in never[:max_unselected]:
        d = rows.get(k)
        if d is not None:
            conf = d.teacher_conf
            tiles.append(_tile(th, d, d.cls or "", k + (f" · {conf:.2f}" if isinstance(conf, (int, float)) else "")))
    return (f'<h4>never selected <span class="count">{len(never)}</span> <small>of {len(pool)} kept images, over '
            f'{len(dr.selection)} epochs</small></h4>'
            + _grid(tiles, len(never) - max_unselected, "every kept image was selected at least once"))


def _distill_run(run: Run, dr, ds: dict, classes: list[str], th: Thumbs, max_unselected: int) -> str:
    tiles = [("student top-1", _pct(ds["top1"])), ("teacher top-1", _pct(ds["teacher_top1"])),
             ("agreement", _pct(ds["agreement"])), ("selected (last epoch)", _pct(ds["selected_fraction"])),
             ("epochs", str(ds["epochs"])), ("params", f'{ds["params"]:,}' if ds.get("params") else "–")]
    cards = "".join(f'<div class="card small"><div class="big">{e(v)}</div><div class="cap">{e(k)}</div></div>'
                    for k, v in tiles)
    eval_note = f' · evaluated on {e(str(ds["eval"]))}' if ds.get("eval") else ""
    status = "" if ds["finished"] else ' <span class="pill" style="background:#ca8a04">running / unfinished</span>'
    acc = [("student top-1 (eval)", "#2563eb", [(float(ep.get("epoch", j)), float(ep["eval_top1"]))
                                                for j, ep in enumerate(dr.epochs)
                                                if isinstance(ep.get("eval_top1"), (int, float))]),
           ("agreement with teacher (val)", "#16a34a", [(float(ep.get("epoch", j)), float(ep["val_agreement"]))
                                                        for j, ep in enumerate(dr.epochs)
                                                        if isinstance(ep.get("val_agreement"), (int, float))])]
    parts = [f'<section class="drun" id="distill-{e(dr.name)}"><h3>{e(dr.name)}{status}</h3>'
             f'<p class="note">{e(str(ds["method"]))} · student {e(str(ds["student"]))} · '
             f'teacher {e(str(ds["teacher"] or "–"))}{eval_note}</p><div class="cards">{cards}</div>',
             '<div class="charts">', _selection_chart(dr, ds, classes),
             f'<div><h4>accuracy per epoch</h4>{charts.lines(acc, ylabel="accuracy", percent=True)}</div>']
    conf = ds.get("confusion")
    if conf and len(conf) == len(classes):
        title = f"{dr.name}: the student on {ds.get('eval') or 'the eval set'}"
        parts.append(f'<div><h4>confusion matrix</h4>{charts.confusion(conf, classes, title)}</div>')
    parts.append("</div>")
    if dr.selects:
        parts.append(_never_selected(run, dr, th, max_unselected))
    else:
        parts.append(f'<p class="note">{e(str(ds["method"]))} selects nothing: every image is used every epoch.</p>')
    parts.append("</section>")
    return "".join(parts)


def _section_distill(run: Run, s: dict, th: Thumbs, max_unselected: int) -> str:
    if not run.distill_runs:
        return '<p class="empty">no distill runs yet (distill/*/metrics.json)</p>'
    out = [_section_compare(s)] if len(run.distill_runs) > 1 else []
    out += [_distill_run(run, dr, ds, s["classes"], th, max_unselected) for dr, ds in zip(run.distill_runs, s["distill"])]
    return "".join(out)


CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg)}
header.top{background:linear-gradient(120deg,#1e3a8a,#2563eb 60%,#0891b2);color:#fff;padding:28px 40px 22px}
header.top h1{margin:0;font-size:26px;letter-spacing:-.01em}
header.top h1 span{opacity:.75;font-weight:400}
.meta{margin-top:10px;display:flex;flex-wrap:wrap;gap:8px}
.meta span{background:rgba(255,255,255,.15);border-radius:999px;padding:2px 10px;font-size:12.5px}
nav{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.92);backdrop-filter:blur(6px);border-bottom:1px solid var(--line);padding:8px 40px;display:flex;gap:18px;flex-wrap:wrap}
nav a{color:var(--ink);text-decoration:none;font-weight:500;font-size:13.5px}
nav a:hover{color:var(--accent)}
main{max-width:1280px;margin:0 auto;padding:8px 40px 60px}
h2{font-size:19px;margin:34px 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:16px;margin:0 0 8px;display:flex;align-items:center;gap:8px}
h4{font-size:13.5px;margin:14px 0 8px;color:#374151}
h5{font-size:13px;margin:12px 0 6px;font-weight:500;display:flex;gap:8px;align-items:center}
small{color:var(--muted);font-weight:400}
.count{background:#eef2ff;color:#3730a3;border-radius:999px;padding:0 8px;font-size:12px;font-weight:600}
.panel,section.cls,section.drun{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 20px;margin:14px 0;box-shadow:0 1px 2px rgba(0,0,0,.03)}
.missing{background:#fffbeb;border:1px solid #fcd34d;border-radius:10px;padding:10px 16px;margin:18px 0 0}
.missing li{margin:2px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:14px 18px;min-width:150px}
.card.small{padding:10px 14px;min-width:120px;background:#f9fafb}
.card .big{font-size:24px;font-weight:700;letter-spacing:-.02em}
.card.small .big{font-size:19px}
.card .cap{color:var(--muted);font-size:12.5px}
.tablewrap{overflow-x:auto}
table.counts{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);border-radius:12px;overflow:hidden}
table.counts th,table.counts td{padding:7px 8px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
table.counts thead th{background:#f3f4f6;font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#4b5563}
table.counts tr.group th{background:#f3f4f6;border-bottom:0;padding:6px 8px 0}
table.counts th.grp{text-align:center!important;color:#b45309;border-bottom:2px solid #f59e0b!important;padding-bottom:2px}
table.counts th[scope=row],table.counts thead th:first-child,table.counts tfoot th{text-align:left}
table.counts tbody tr:nth-child(even){background:#fafafa}
table.counts td.z{color:#d1d5db}
table.counts td.kept{color:#15803d;font-weight:700}
table.counts tfoot td,table.counts tfoot th{font-weight:700;background:#f9fafb}
table.counts a{color:inherit;text-decoration:none}
.ratecell{min-width:140px;text-align:left!important}
.rate{display:inline-block;width:90px;height:8px;background:#eef0f3;border-radius:6px;overflow:hidden;vertical-align:middle;margin-right:6px}
.rate div{height:100%}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px;vertical-align:baseline}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:10px}
.tile{margin:0;position:relative;background:#f3f4f6;border-radius:8px;overflow:hidden;border:1px solid var(--line)}
.tile img{display:block;width:100%;aspect-ratio:1;object-fit:cover;background:#e5e7eb}
.tile figcaption{padding:4px 7px 6px;font-size:11.5px;line-height:1.3}
.tile figcaption span,.tile figcaption small{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.tile figcaption small{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:10.5px}
.badge{position:absolute;top:6px;left:6px;color:#fff;font-size:10.5px;font-weight:600;padding:1px 7px;border-radius:999px;box-shadow:0 1px 2px rgba(0,0,0,.25)}
.pill{color:#fff;font-size:11.5px;font-weight:600;padding:1px 8px;border-radius:999px;margin-right:2px}
details.dropped{margin-top:14px;border-top:1px dashed var(--line);padding-top:10px}
.reasons{display:flex;flex-wrap:wrap;gap:12px;margin-top:10px}
.reasongroup{background:#fafafa;border:1px solid var(--line);border-top:3px solid;border-radius:10px;padding:6px 10px 10px;max-width:100%}
.reasongroup h5{margin:2px 0 8px}
.reasongroup .row{display:flex;flex-wrap:wrap;gap:8px}
.reasongroup .tile{width:128px}
details.dropped summary{cursor:pointer;font-weight:600;font-size:13.5px;color:#374151}
.dups{display:flex;flex-wrap:wrap;gap:14px}
.dupgroup{display:flex;gap:10px;background:var(--card);border:1px solid var(--line);border-radius:12px;padding:12px}
.dupgroup .tile{width:150px}
.dupgroup .tile:first-child{outline:2px solid #16a34a;outline-offset:-2px}
.hists{display:flex;flex-wrap:wrap;gap:12px}
.histcard{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:10px 12px}
.histtitle{font-weight:600;margin-bottom:4px}
.histtitle small{display:block;font-weight:400}
.charts{display:flex;flex-wrap:wrap;gap:12px 28px;align-items:flex-start}
.charts>div{flex:0 1 auto;max-width:560px}
table.compare td:nth-child(-n+3),table.compare th:nth-child(-n+3){text-align:left}
.legend{display:flex;flex-wrap:wrap;gap:12px;margin:4px 0 0 4px;font-size:12.5px}
.key i{display:inline-block;width:12px;height:4px;border-radius:2px;margin-right:5px;vertical-align:middle}
svg.chart{max-width:100%;height:auto;overflow:visible}
svg .lbl{font-size:13px;fill:#374151}
svg .num{font-size:13px;font-weight:700;fill:#111827}
svg .drop{font-size:12px;fill:#dc2626}
svg .tick{font-size:11px;fill:#6b7280}
svg .grid{stroke:#eef0f3}
svg .axis{stroke:#9ca3af}
.empty{color:var(--muted);font-style:italic}
.more,.note{color:var(--muted);font-size:12.5px;margin:6px 0}
footer{color:var(--muted);text-align:center;font-size:12px;padding:20px}
"""


def render_html(run: Run, out_dir: Path, *, max_kept: int = 48, max_dropped: int = 24, max_groups: int = 24,
                max_unselected: int = 60) -> str:
    s = summarize(run)
    th = Thumbs(run, out_dir)
    m = s.get("manifest") or {}
    meta = [f'{len(s["classes"])} classes']
    if m:
        emb = m.get("embedding") or {}
        meta += [f'{m.get("nsamples")} samples', f'{s["totals"].get("shards")} shards',
                 f'embedding {emb.get("backend")}:{emb.get("model")}', f'config {m.get("config_hash")}',
                 f'curated {m.get("created")}']
    if s["distill"]:
        meta.append(f'{len(s["distill"])} distill run(s)')
    missing = ""
    if s["missing"]:
        missing = ('<div class="missing"><strong>Partial run — missing:</strong><ul>'
                   + "".join(f"<li>{e(x)}</li>" for x in s["missing"]) + "</ul></div>")
    nav = [("overview", "Overview"), ("funnel", "Funnel"), ("counts", "Per class"), ("classes", "Contact sheets")]
    body = [f'<section id="overview">{_section_overview(s)}</section>',
            f'<h2 id="funnel">Stage funnel</h2><div class="panel">{charts.funnel(s["funnel"])}</div>',
            f'<h2 id="counts">Per-class counts</h2>{_section_counts(s)}']
    seen = _Seen(run, s["classes"], max_kept, max_dropped)
    has_dec = seen.any
    body.append('<h2 id="classes">Contact sheets</h2>'
                + ('<p class="note">kept images per class; the dropped ones below each, grouped by reason '
                   '(click a thumbnail for the original file, hover for URL and detail)</p>' if has_dec else "")
                + _section_classes(run, s, th, seen, max_kept, max_dropped))
    if has_dec:
        heading, scores = _section_scores(seen)
        nav += [("dups", "Duplicates"), ("clip", "CLIP scores" if heading.startswith("CLIP") else "Confidence")]
        body.append(f'<h2 id="dups">Duplicate groups</h2><p class="note">the kept image (green) beside each '
                    f'image dropped as its copy (pHash + pixels, or embedding cosine)</p>'
                    f'{_section_dups(run, th, seen, max_groups)}')
        body.append(f'<h2 id="clip">{e(heading)}</h2>{scores}')
    nav.append(("distill", "Distillation"))
    body.append(f'<h2 id="distill">Distillation</h2>{_section_distill(run, s, th, max_unselected)}')
    loop_section = loop_html(run)  # the crawl-selection loop: pipeline/app/loop_view.py
    if loop_section:
        nav.append(("loop", "Loop"))
        body.append(f'<h2 id="loop">Crawl-selection loop</h2>{loop_section}')
    navhtml = "".join(f'<a href="#{a}">{e(b)}</a>' for a, b in nav)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log.info("report: %d new thumbnails", th.written)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>kd3 report · {e(s['run'])}</title>"
        "<link rel=\"icon\" href=\"data:,\">"
        f"<style>{CSS}</style></head><body>"
        f'<header class="top"><h1>kd3 report <span>· {e(s["run"])}</span></h1>'
        f'<div class="meta">{"".join(f"<span>{e(x)}</span>" for x in meta)}</div></header>'
        f"<nav>{navhtml}</nav><main>{missing}{''.join(body)}</main>"
        f"<footer>generated by kd3 inspect · {e(now)}</footer></body></html>\n"
    )


def write_report(run_dir, **kw) -> Path:
    """Write ``runs/<name>/report/index.html`` (+ thumbs/); returns the path of index.html."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    out_dir = run.rd.report
    out_dir.mkdir(parents=True, exist_ok=True)
    page = render_html(run, out_dir, **kw)
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    return path
