"""Per query class yield and starved-class detection, on a run directory written through core.records."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.io import atomic_write_json
from pipeline.core.records import ALL, CrawlRecord, Decision, RecordLog, SelectionRow, append_selection, \
    write_decisions, write_metrics, write_pool_keys
from pipeline.core.runs import RunDir
from pipeline.core.yields import compare_rows, yield_table

# class -> [(query, n downloaded, n kept, n selected in each of the last epochs)]
LAYOUT = {
    "cat": [("cat", 12, 10, 8), ("cat photo", 4, 4, 2)],
    "dog": [("dog", 12, 11, 9)],
    "eel": [("eel", 6, 5, 1), ("eel close-up", 3, 3, 2)],
}


def _sha(cls: str, q: str, i: int) -> str:
    import hashlib

    return hashlib.sha256(f"{cls}/{q}/{i}".encode()).hexdigest()


def make_run(root: Path, selection: str = "keys", epochs: int = 2) -> tuple[Path, Path]:
    rd = RunDir(root)
    log = RecordLog(rd.records)
    decisions, pool, selected = [], [], []
    for label, (cls, queries) in enumerate(LAYOUT.items()):
        for q, n_dl, n_kept, n_sel in queries:
            for i in range(n_dl):
                sha = _sha(cls, q, i)
                log.append(CrawlRecord(cls=cls, query=q, engine="bing", url=f"http://x/{sha}", status="ok",
                                       sha256=sha, path=f"crawl/images/{sha[:2]}/{sha}.jpg"))
                kept = i < n_kept
                d = Decision(id=sha, cls=cls, label=label, path="", url="", key=sha[:16] if kept else None)
                if not kept:
                    d.drop("phash_dup")
                decisions.append(d)
                if kept:
                    pool.append(sha[:16])
                    if i < n_sel:
                        selected.append(sha[:16])
            # a second record of the same image under another query (a duplicate) is not a download
            log.append(CrawlRecord(cls=cls, query=q + " again", engine="bing", url="http://x/dup", status="duplicate",
                                   sha256=_sha(cls, q, 0)))
    log.close()
    write_decisions(rd.decisions, decisions)
    md = rd.distill / "kd3-x"
    write_pool_keys(md / "pool_keys.txt", pool)
    for e in range(epochs):
        row = SelectionRow(e, selected=ALL) if selection == "all" else SelectionRow(e, selected=selected)
        append_selection(md / "selection.jsonl", row)
    write_metrics(md / "metrics.json", {"method": "kd" if selection == "all" else "kd3",
                                        "final": {"val_agreement_per_class": {"cat": 0.9, "dog": 0.8, "eel": 0.25}}})
    return root, md


def test_yield_per_query_class_and_starved_by_default_line(tmp_path):
    run, md = make_run(tmp_path / "r")
    t = yield_table(run, md, list(LAYOUT), last_epochs=2)
    assert t.selects and t.method == "kd3" and t.epochs == [0, 1]
    cat, dog, eel = t.classes["cat"], t.classes["dog"], t.classes["eel"]
    assert (cat.downloaded, cat.kept, cat.pool, cat.selected) == (16, 14, 14, 10)
    assert (eel.downloaded, eel.kept, eel.selected) == (9, 8, 3)
    assert eel.ratio == pytest.approx(3 / 8) and eel.agreement == 0.25
    # default line: half the median class (cat 10, dog 9, eel 3 -> median 9 -> 4.5)
    assert t.min_selected == pytest.approx(4.5)
    assert t.starved == ["eel"] and not cat.starved and not dog.starved
    # per query: what each query downloaded first, kept and got selected; best selected-per-download first
    q = {x.query: x for x in eel.queries}
    assert set(q) == {"eel", "eel close-up"}
    assert (q["eel close-up"].downloaded, q["eel close-up"].kept, q["eel close-up"].selected) == (3, 3, 2)
    assert [x.query for x in eel.queries] == ["eel close-up", "eel"]


def test_explicit_min_selected_and_last_epochs_mean(tmp_path):
    run, md = make_run(tmp_path / "r")
    # a third epoch selecting nothing: the mean over the last 2 epochs halves every count
    append_selection(md / "selection.jsonl", SelectionRow(2, selected=[]))
    t = yield_table(run, md, list(LAYOUT), last_epochs=2, min_selected=4.6)
    assert t.classes["cat"].selected == 5 and t.classes["eel"].selected == 1.5
    assert t.starved == ["dog", "eel"]  # dog 4.5 < 4.6


def test_kd_selects_everything_so_starvation_reads_kept_images(tmp_path):
    run, md = make_run(tmp_path / "r", selection="all")
    t = yield_table(run, md, list(LAYOUT), last_epochs=3)
    assert not t.selects and t.method == "kd"
    assert {c: y.selected for c, y in t.classes.items()} == {"cat": 14, "dog": 11, "eel": 8}
    assert t.starved == []  # 8 >= half the median (11)
    assert yield_table(run, md, list(LAYOUT), starved_fraction=0.8).starved == ["eel"]


def test_compare_rows_before_after(tmp_path):
    run, md = make_run(tmp_path / "r")
    before = yield_table(run, md, list(LAYOUT), last_epochs=2)
    rows = {r[0]: r for r in compare_rows(before, before)}
    assert rows["eel"][2] == "3 -> 3" and rows["eel"][5] == "yes -> yes"
    assert "eel close-up (bing) 2/3" in rows["eel"][6]
    assert compare_rows(None, before)[0][1] == "14"
    atomic_write_json(tmp_path / "t.json", before.to_row())  # JSON-able
