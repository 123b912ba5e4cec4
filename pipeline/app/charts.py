"""The report's charts, drawn with matplotlib and embedded as inline SVG (the page stays one static file).

matplotlib is imported inside :func:`_figure` only, so ``kd3 --help`` and ``kd3 inspect`` without
``--html`` never load it. Figures use the object API (``matplotlib.figure.Figure``): no pyplot, no
global backend, nothing drawn to a screen. Text stays text (``svg.fonttype: none``), ids inside each
SVG are prefixed so several charts on one page never share an id, and no date is written (the same
run gives the same page).
"""
from __future__ import annotations

import io
import itertools
import re
from contextlib import contextmanager
from typing import Optional, Sequence

_counter = itertools.count()

INK, MUTED, GRID = "#111827", "#6b7280", "#e5e7eb"
KEPT, DROPPED = "#16a34a", "#dc2626"
RC = {"svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 10, "axes.edgecolor": "#9ca3af",
      "axes.labelcolor": "#374151", "xtick.color": MUTED, "ytick.color": MUTED, "axes.grid": True,
      "grid.color": GRID, "grid.linewidth": 0.8, "axes.axisbelow": True, "axes.spines.top": False,
      "axes.spines.right": False, "legend.frameon": False, "figure.dpi": 96}


@contextmanager
def _figure(w: float, h: float, **subplots):
    """A matplotlib Figure of ``w`` x ``h`` inches (96 px each) with its axes, under kd3's style."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(w, h), layout="constrained")
        yield fig, fig.subplots(**subplots)


def _svg(fig, label: str) -> str:
    """The figure as an inline ``<svg>`` (no XML prolog, ids unique on the page, width from the figure)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**RC, "svg.hashsalt": f"kd3-{label}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    prefix = f"c{next(_counter)}-"
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r'(url\(#|href="#)([^")]+)', lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids
                                                                      else m.group(2)), text)
    width = int(round(fig.get_figwidth() * 96))
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                  lambda m: f'<svg{m.group(1)} class="chart mpl" role="img" aria-label="{label}" '
                            f'style="width:{width}px;max-width:100%;height:auto"', text, count=1)
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def funnel(steps: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars, one per stage, with the count and what the stage removed."""
    if not steps:
        return '<p class="empty">no stage has run yet</p>'
    labels, values = [s for s, _ in steps], [n for _, n in steps]
    top = max(values) or 1
    with _figure(9.0, 0.36 * len(steps) + 0.5) as (fig, ax):
        y = list(range(len(steps)))[::-1]
        ax.barh(y, values, color="#2563eb", alpha=0.85, height=0.7)
        ax.set_yticks(y, labels)
        ax.set_xlim(0, top * 1.22)
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0, labelsize=11, labelcolor=INK)
        prev = None
        for yy, n in zip(y, values):
            ax.text(n + top * 0.01, yy, f"{n:,}" + (f"   −{prev - n:,}" if prev is not None and prev > n else ""),
                    va="center", fontsize=10, color=INK)
            prev = n
        return _svg(fig, "stage funnel")


def lines(series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]], *, ylabel: str,
          percent: bool = False, title: Optional[str] = None, w: float = 5.5, h: float = 2.9) -> str:
    """Line chart of ``(name, colour, [(x, y)])`` over epochs; the y axis fits the data (or 0-100 %)."""
    series = [s for s in series if s[2]]
    if not series:
        return '<p class="empty">no data</p>'
    with _figure(w, h) as (fig, ax):
        for name, color, pts in series:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, [100 * v for v in ys] if percent else ys, marker="o", ms=3.5, lw=1.8, color=color,
                    label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if percent:
            ax.set_ylim(0, 100)
            ax.yaxis.set_major_formatter("{x:.0f}%")
        else:
            ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if title:
            ax.set_title(title, fontsize=10, color=INK, loc="left")
        if len(series) > 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, handlelength=1.4)
        return _svg(fig, ylabel)


def histograms(panels: Sequence[tuple[str, str, Sequence[float], Sequence[float]]], *, xlabel: str,
               lo: float = 0.0, hi: float = 1.0, bins: int = 20, cols: int = 5) -> str:
    """Small multiples: per ``(title, colour, kept values, dropped values)`` a stacked histogram."""
    if not panels:
        return '<p class="empty">no scores</p>'
    import numpy as np

    cols = min(cols, len(panels))
    rows = -(-len(panels) // cols)
    edges = np.linspace(lo, hi, bins + 1)
    with _figure(2.35 * cols, 1.9 * rows + 0.3, nrows=rows, ncols=cols, sharex=True, squeeze=False) as (fig, axs):
        for ax in axs.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (title, color, kept, dropped) in zip(axs.flat, panels):
            ax.hist([list(kept), list(dropped)], bins=edges, stacked=True, color=[KEPT, DROPPED],
                    label=["kept", "dropped"])
            ax.set_title(title, fontsize=8.5, color=color, loc="left")
            ax.tick_params(labelsize=8)
        for ax in axs[-1]:
            ax.set_xlabel(xlabel, fontsize=8.5)
        axs.flat[0].legend(fontsize=8, loc="upper left")
        return _svg(fig, xlabel)


def runs_compared(names: Sequence[str], metrics: dict[str, Sequence[Optional[float]]]) -> str:
    """Grouped horizontal bars: per distill run, each metric (a share 0-1) as a bar with its value."""
    if not names:
        return '<p class="empty">no distill runs</p>'
    import numpy as np

    colors = ["#2563eb", "#9ca3af", "#16a34a", "#ea580c"]
    k = len(metrics)
    hbar = 0.8 / k
    with _figure(7.6, 0.45 + len(names) * (0.19 * k + 0.25)) as (fig, ax):
        y = np.arange(len(names))[::-1]
        for j, ((label, vals), color) in enumerate(zip(metrics.items(), colors)):
            pos = y + 0.4 - hbar * (j + 0.5)
            v = [100 * x if x is not None else 0 for x in vals]
            ax.barh(pos, v, height=hbar * 0.9, color=color, label=label)
            for p, x, raw in zip(pos, v, vals):
                ax.text(x + 1, p, "–" if raw is None else f"{x:.1f}%", va="center", fontsize=8.5, color=INK)
        ax.set_yticks(y, names)
        ax.set_xlim(0, 112)
        ax.xaxis.set_major_formatter("{x:.0f}%")
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0, labelsize=10, labelcolor=INK)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        return _svg(fig, "distill runs compared")


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> str:
    """Heatmap of a confusion matrix (rows: true class, columns: predicted), shaded by row share, with counts."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    side = min(6.0, 1.6 + 0.42 * n)
    with _figure(side + 0.9, side) as (fig, ax):
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.grid(False)
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8.5)
        ax.set_yticks(range(n), classes, fontsize=8.5)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true class")
        ax.set_title(title, fontsize=10, color=INK, loc="left")
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7.5,
                            color="white" if share[i, j] > 0.55 else INK)
        fig.colorbar(im, ax=ax, shrink=0.8, format=lambda x, _: f"{100 * x:.0f}%")
        return _svg(fig, title)
