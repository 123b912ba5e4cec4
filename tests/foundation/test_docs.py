"""The docs name functions that exist, with the parameters they take: every ``module.function(params)`` that
docs/INTERFACES.md and docs/DESIGN.md write in backticks is imported and its signature compared."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PACKAGES = ("pipeline", "crawlers", "distill", "flows", "kd3demo")
CALL = re.compile(r"`((?:%s)(?:\.\w+)+)\(([^`)]*)\)" % "|".join(PACKAGES))


def named_calls() -> list[tuple[str, str, str]]:
    out = []
    for doc in ("INTERFACES.md", "DESIGN.md"):
        for m in CALL.finditer((DOCS / doc).read_text(encoding="utf-8")):
            out.append((doc, m.group(1), m.group(2)))
    return out


def resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_docs_name_some_functions():
    assert len(named_calls()) >= 10


@pytest.mark.parametrize("doc, dotted, params", named_calls(), ids=lambda v: str(v)[:60])
def test_a_documented_function_exists_with_its_parameters(doc, dotted, params):
    fn = resolve(dotted)
    fn = getattr(fn, "fn", fn)  # a Prefect flow or task wraps the function
    sig = inspect.signature(fn)
    for p in (x.strip() for x in params.split(",")):
        name = p.split("=")[0].strip()
        if not name or name in ("*", "...", "/") or not name.isidentifier():
            continue
        assert name in sig.parameters, f"{doc}: {dotted}({params}) names {name!r}; it takes {list(sig.parameters)}"
