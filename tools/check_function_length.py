"""No function longer than ``--max`` lines (default 80) outside tests: a long function is a step
that wants its own name.

    python tools/check_function_length.py [--max 80]     # lists offenders; exit 1 when there is one
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "crawlers", "distill", "flows", "demo/kd3demo", "bench", "tools")


def lengths(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.lineno, node.end_lineno - start + 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=80)
    ap.add_argument("--top", type=int, default=5, help="also print the longest N functions")
    a = ap.parse_args(argv)
    rows = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            rows += [(n, f"{p.relative_to(ROOT)}:{line}", name) for name, line, n in lengths(p)]
    rows.sort(reverse=True)
    bad = [r for r in rows if r[0] > a.max]
    for n, where, name in bad:
        print(f"too long: {where} {name}: {n} lines > {a.max}")
    print(f"{len(rows)} functions; longest: " + ", ".join(f"{name} {n} ({where})" for n, where, name in rows[:a.top]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
