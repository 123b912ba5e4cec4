"""Scoring against the demo world's ground truth (analysis only: the pipeline never sees it): what curate
kept and what a method selected, by the kind of image the world made (a real digit, a digit of another
class, junk, a copy). Used by `kd3 demo` for its results and by bench/accuracy.py and bench/loop.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.records import read_decisions, read_pool_keys, read_selection


def truth_by_sha(truth_rows: list[dict]) -> dict[str, dict]:
    """sha256 → truth row; an exact duplicate shares its original's bytes, so the original wins."""
    out: dict[str, dict] = {}
    for r in truth_rows:
        if r["sha256"] not in out or out[r["sha256"]]["kind"] == "duplicate":
            out[r["sha256"]] = r
    return out


DIGIT_KINDS = ("digit", "other_digit")  # real digits (the query of an other_digit names another class)


def kind_by_key(truth_rows: list[dict]) -> dict[str, str]:
    """Selection key (sha256[:16]) -> ground-truth kind; a copy counts as the kind it copies."""
    return {sha[:16]: (r.get("params", {}).get("of_kind") or r["kind"]) for sha, r in truth_by_sha(truth_rows).items()}


def selection_breakdown(method_dir: Path, truth_rows: list[dict]) -> dict[str, Any]:
    """What a method trained on in its last epoch, by ground-truth kind (analysis only); any form of
    the selection log (a key list, "all" of the pool, a bitmask over pool_keys.txt)."""
    sel = read_selection(method_dir / "selection.jsonl")
    if not sel:
        return {}
    last = sel[-1]
    keys = last.keys(read_pool_keys(method_dir / "pool_keys.txt"), method_dir)
    kind = kind_by_key(truth_rows)
    kinds: dict[str, int] = {}
    for k in keys:
        kinds[kind.get(k, "unknown")] = kinds.get(kind.get(k, "unknown"), 0) + 1
    return {"epoch": last.epoch, "selected": len(keys), "by_kind": dict(sorted(kinds.items()))}


def selection_quality(method_dir: Path, truth_rows: list[dict]) -> list[dict[str, Any]]:
    """Per epoch, against the world's ground truth: how many images were selected, the share of them that
    are real digits (precision), the share of the pool's digits selected (recall), and the share of the
    pool's junk selected (junk kept)."""
    pool = read_pool_keys(Path(method_dir) / "pool_keys.txt")
    kind = kind_by_key(truth_rows)
    digits = {k for k in pool if kind.get(k) in DIGIT_KINDS}
    n_junk = len(pool) - len(digits)
    out = []
    for row in read_selection(Path(method_dir) / "selection.jsonl"):
        sel = row.keys(pool, method_dir)
        dig = len(sel & digits)
        out.append({"epoch": row.epoch, "selected": len(sel),
                    "precision": dig / len(sel) if sel else None,
                    "recall": dig / len(digits) if digits else None,
                    "junk_kept": (len(sel) - dig) / n_junk if n_junk else None})
    return out


def curate_breakdown(run_dir: Path, truth_rows: list[dict]) -> dict[str, Any]:
    """Curate decisions by ground-truth kind: {kind: {"kept": n, reason: n}} (analysis only)."""
    rows = read_decisions(run_dir / "curate" / "decisions.jsonl")
    truth = truth_by_sha(truth_rows)
    out: dict[str, dict[str, int]] = {}
    for d in rows:
        t = truth.get(d.id)
        kind = "unknown" if t is None else t["kind"]
        key = "kept" if d.kept else (d.reason.value if d.reason else "dropped")
        out.setdefault(kind, {}).setdefault(key, 0)
        out[kind][key] += 1
    return out
