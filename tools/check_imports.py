"""Import cycles between kd3's own files, counting every import: module level, inside functions,
and a package ``__init__`` that its own submodules import back.

    python tools/check_imports.py            # prints the cycles; exit 1 when there is one

import-linter's contracts keep the layers pointing down; this catches cycles inside one layer too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "crawlers", "distill", "flows", "demo/kd3demo")  # folders, each a top-level package


def module_of(path: Path, base: Path = ROOT) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(node: ast.AST, mod: str, is_pkg: bool, known: set[str]) -> list[str]:
    """The kd3 modules one import statement names (``from a import b`` names ``a.b`` when it is a module)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        out = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    found = []
    for name in out:
        while name and name not in known:  # `import a.b.c` of a package path: the deepest kd3 module
            name = name.rpartition(".")[0]
        if name and name != mod:
            found.append(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_of(p, (ROOT / pkg).parent): p for pkg in PACKAGES if (ROOT / pkg).is_dir()
             for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    g: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                g[mod].update(imported(node, mod, path.name == "__init__.py", known))
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    g = graph()
    found = cycles(g)
    edges = sum(len(v) for v in g.values())
    for c in found:
        print("import cycle: " + " <-> ".join(c))
    print(f"{len(g)} modules, {edges} imports between them, {len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
