"""``kd3 inspect``: its arguments and what each combination does (the work is in :mod:`.inspect`
and :mod:`.report`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.core.errors import Kd3Error

from .inspect import Run, fmt, class_sheet, neighbour_sheet, render_summary, similar, summarize, text_query
from .loop_view import loop_summary, render_loop
from .report import write_report


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory runs/<name> or its manifest.json")
    p.add_argument("--html", action="store_true", help="write the static report runs/<name>/report/index.html")
    p.add_argument("--similar", metavar="IMG|KEY", help="nearest neighbours of an image file or an image id/key")
    p.add_argument("--text", metavar="PROMPT", help='nearest neighbours of a text prompt (needs real CLIP weights)')
    p.add_argument("-k", type=int, default=16, help="neighbours to return (default: 16)")
    p.add_argument("--class", dest="cls", metavar="C", help="class for --sheet")
    p.add_argument("--sheet", type=Path, metavar="OUT.png",
                   help="contact sheet PNG (of --class, or of the --similar/--text neighbours)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--log-level", default="WARNING", help="logging level")


def _print_hits(hits: list[dict], title: str) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for col in ("#", "score", "class", "key", "path"):
        t.add_column(col, justify="right" if col in ("#", "score") else "left")
    for h in hits:
        t.add_row(str(h["rank"]), f"{h['score']:.4f}", fmt(h.get("class")), (h.get("key") or h["id"])[:16],
                  fmt(h.get("path")))
    Console().print(t)


def inspect_cli(args) -> int:
    if args.k <= 0:
        raise Kd3Error(f"-k must be positive, got {args.k}")
    run = Run(args.path)
    did = False
    if args.similar or args.text:
        if args.similar and args.text:
            raise Kd3Error("give --similar or --text, not both")
        if args.similar:
            hits, info = similar(run, args.similar, k=args.k)
            title = f"neighbours of {args.similar}"
            qimg = info.get("path")
        else:
            hits, qimg = text_query(run, args.text, k=args.k), None
            title = f'neighbours of "{args.text}"'
        _print_hits(hits, title)
        out = args.sheet or run.rd.report / ("similar.png" if args.similar else "text.png")
        neighbour_sheet(run, hits, out, title=title, query_image=qimg)
        print(f"sheet: {out}")
        did = True
    elif args.sheet is not None or args.cls is not None:
        if args.cls is None or args.sheet is None:
            raise Kd3Error("--class and --sheet go together: kd3 inspect RUN --class C --sheet out.png")
        out = class_sheet(run, args.cls, args.sheet)
        print(f"sheet: {out}")
        did = True
    if args.html:
        path = write_report(run)
        print(f"report: {path}")
        did = True
    if not did:
        s = summarize(run)
        if args.json:
            print(json.dumps({**s, "loop": loop_summary(run)}, indent=2, default=str))
        else:
            render_summary(s)
            render_loop(run)
    return 0
