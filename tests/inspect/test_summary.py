"""kd3 inspect: the numbers printed equal the manifest's and the decisions'; partial runs; bad input."""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter

import pytest
from PIL import Image
from rich.console import Console

from pipeline.app.cli import main
from pipeline.core.errors import DataError, Kd3Error
from pipeline.app.inspect import Run, class_sheet, render_summary, similar, summarize, text_query
from pipeline.core.io import atomic_write_json, read_json, read_jsonl
from pipeline.core.records import DROP_REASONS


def test_summary_numbers_equal_manifest_and_decisions(full_run):
    s = summarize(full_run.root)
    m = read_json(full_run.manifest)
    decisions = read_jsonl(full_run.decisions)
    records = read_jsonl(full_run.records)
    assert s["classes"] == m["classes"]
    for c in m["classes"]:
        row = s["per_class"][c]
        mine = [d for d in decisions if d["class"] == c]
        assert row["kept"] == m["class_counts"][c] == sum(d["kept"] for d in mine)
        for r in DROP_REASONS:
            assert row[r] == sum(d["reason"] == r for d in mine), (c, r)
        assert row["crawled"] == sum(r["class"] == c for r in records)
        assert row["downloaded"] == sum(r["class"] == c and r["status"] == "ok" for r in records)
        assert row["valid"] == len(mine) - sum(d["reason"] in ("invalid", "too_small", "bad_aspect", "bomb")
                                               for d in mine)
        assert row["shards"] == len({d["shard"] for d in mine if d["kept"]})
    # totals agree with the manifest's stage stats and shard list
    dropped_in_stats = Counter()
    for st in m["stats"].values():
        dropped_in_stats.update(st["dropped"])
    for r in DROP_REASONS:
        assert s["totals"][r] == dropped_in_stats[r]
    assert s["totals"]["kept"] == m["nsamples"]
    assert s["totals"]["shards"] == len(m["shardlist"])
    # bytes = the kept samples' members in the shard tars
    size = 0
    for sh in m["shardlist"]:
        with tarfile.open(full_run.root / sh["url"]) as tf:
            size += sum(ti.size for ti in tf if ti.isfile())
    assert s["totals"]["bytes"] == size > 0
    # funnel ends at the kept count and never grows
    counts = [n for _, n in s["funnel"]]
    assert counts[-1] == m["nsamples"] and counts == sorted(counts, reverse=True)
    assert s["missing"] == []
    assert s["totals"]["kept_unique"] == len({d["id"] for d in decisions if d["kept"]})


def test_the_summary_reads_records_and_decisions_a_row_at_a_time(full_run):
    """kd3 inspect's summary streams the crawl records and the decisions (10^6 rows at a pool's size) instead
    of holding them, and says the same as from the rows loaded."""
    run = Run(full_run.root)
    streamed = summarize(run)
    assert "records" not in run.__dict__ and "decisions" not in run.__dict__
    loaded = Run(full_run.root)
    assert len(loaded.records) and len(loaded.decisions)  # loaded first: the summary walks the lists
    assert summarize(loaded) == streamed


def test_distill_runs_accuracy_and_selection_rates(full_run):
    s = summarize(full_run.root)
    runs = {d["name"]: d for d in s["distill"]}
    assert set(runs) == {"kd3-fixture", "kd-fixture"}
    metrics = read_json(full_run.distill / "kd3-fixture" / "metrics.json")
    kd3 = runs["kd3-fixture"]
    assert kd3["top1"] == metrics["final"]["top1"] and kd3["teacher_top1"] == metrics["final"]["teacher_top1"]
    assert kd3["agreement"] == metrics["final"]["agreement"] and kd3["epochs"] == len(metrics["epochs"])
    last = metrics["epochs"][-1]["selected_per_class"]
    pred = read_jsonl(full_run.distill / "kd3-fixture" / "selection.jsonl")[-1]["pred_counts"]
    m = read_json(full_run.manifest)
    # kd3 counts a selected image under its teacher label: the share is out of the pool images with that
    # label, never out of the query class's kept images (which put "cat" at 137.5%)
    assert kd3["selection_by"] == "teacher label" and last["cat"] > m["class_counts"]["cat"]
    for i, c in enumerate(m["classes"]):
        assert kd3["selected_last"][c] == last[c] and kd3["selected_of"][c] == pred[i]
        assert kd3["selection_rate"][c] == pytest.approx(last[c] / pred[i]) and kd3["selection_rate"][c] <= 1
    kd = runs["kd-fixture"]
    assert kd3["has_selection_log"] and not kd["has_selection_log"]
    assert kd["selection_by"] == "query label" and kd["selection_rate"]["cat"] == 1.0
    assert kd3["teacher"] == "cnn_small · 3 classes · top-1 85.0%" and kd["teacher"] == "teacher.pt · top-1 85.0%"


def _table_rows(text: str, names: list[str]) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in names and parts[0] not in rows:
            rows[parts[0]] = parts[1:]
    return rows


def test_printed_tables_match_summary(full_run):
    s = summarize(full_run.root)
    con = Console(width=200, record=True, file=io.StringIO(), color_system=None)
    render_summary(s, con)
    text = con.export_text()
    rows = _table_rows(text, s["classes"] + ["total"])
    keys = ["crawled", "downloaded", "valid", "exact_dup", "phash_dup", "near_dup", "cross_class_dup",
            "contaminated", "off_class", "kept", "shards"]
    for c in s["classes"]:
        assert [int(x) for x in rows[c][: len(keys)]] == [s["per_class"][c][k] for k in keys], c
    assert [int(x) for x in rows["total"][: len(keys)]] == [s["totals"][k] for k in keys]
    # distill table: top-1 / teacher / agreement as percentages
    drows = _table_rows(text, [d["name"] for d in s["distill"]])
    kd3 = next(d for d in s["distill"] if d["name"] == "kd3-fixture")
    assert drows["kd3-fixture"][3:6] == [f"{100 * kd3[k]:.1f}%" for k in ("top1", "teacher_top1", "agreement")]
    assert drows["kd3-fixture"][7:10] == ["12,345", "2.5", "0.4/3.5"]  # deployed size beside top-1
    assert drows["kd-fixture"][8:10] == ["–", "–/–"]  # a run from before sizes were measured
    assert "selected in the last epoch, per class" in text and "by teacher label" in text
    shares = [float(x) for x in re.findall(r"\((\d+(?:\.\d)?)%\)", text)]
    assert shares and max(shares) <= 100.0
    assert f'{kd3["selected_last"]["cat"]}/{kd3["selected_of"]["cat"]}' in text


def test_cli_summary_and_json(full_run, capsys):
    assert main(["inspect", str(full_run.root)]) == 0
    out = capsys.readouterr().out
    assert "per class" in out and "kd3-fixture" in out
    assert main(["inspect", str(full_run.manifest), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["per_class"] == json.loads(json.dumps(summarize(full_run.root)["per_class"]))


def test_crawl_only_run_says_what_is_missing(crawl_only_run, capsys):
    s = summarize(crawl_only_run.root)
    records = read_jsonl(crawl_only_run.records)
    assert s["per_class"]["cat"]["crawled"] == sum(r["class"] == "cat" for r in records)
    assert s["per_class"]["cat"]["kept"] is None and s["totals"]["kept"] is None
    assert any("kd3 curate" in x for x in s["missing"]) and any("kd3 distill" in x for x in s["missing"])
    assert [label for label, _ in s["funnel"]] == ["URLs tried", "downloaded"]
    assert main(["inspect", str(crawl_only_run.root)]) == 0
    out = capsys.readouterr().out
    assert "missing:" in out and "not curated yet" in out


def test_curate_only_run(curate_only_run):
    rd = curate_only_run
    s = summarize(rd.root)
    assert s["distill"] == [] and s["totals"]["kept"] == read_json(rd.manifest)["nsamples"]
    assert s["missing"] == ["no distill runs (distill/*/metrics.json): run `kd3 distill`"]


def test_bad_input_one_line_errors(tmp_path, full_run, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd3: error:") and "nope" in err and "\n" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="manifest.json"):
        summarize(bad)
    with pytest.raises(DataError, match="class 'dog'"):
        class_sheet(full_run.root, "dog", tmp_path / "x.png")
    assert main(["inspect", str(full_run.root), "--class", "cat"]) == 2
    assert "--class and --sheet" in capsys.readouterr().err
    with pytest.raises(DataError, match="neither an image file nor an id"):
        similar(full_run.root, "ffffffffffffffff")


def test_text_query_refused_without_real_clip(tmp_path, full_run):
    import shutil

    rd = tmp_path / "copy"
    shutil.copytree(full_run.root, rd)
    m = read_json(rd / "manifest.json")
    m["embedding"] = {"backend": "clip", "model": "kd3-tiny-clip", "pretrained": None, "dim": 192, "trained": False}
    atomic_write_json(rd / "manifest.json", m)
    with pytest.raises(Kd3Error, match="needs real CLIP weights"):
        text_query(rd, "a cat")
    m["embedding"] = {"backend": "teacher", "model": "teacher.pt", "pretrained": "/x/teacher.pt", "dim": 64}
    atomic_write_json(rd / "manifest.json", m)
    with pytest.raises(Kd3Error, match="teacher backend"):
        text_query(rd, "a cat")


def test_similar_by_key_finds_the_near_duplicates_original(full_run, tmp_path):
    decisions = read_jsonl(full_run.decisions)
    near = next(d for d in decisions if d["reason"] == "near_dup" and d["class"] == "coffee")
    hits, info = similar(full_run.root, near["id"][:16], k=5)
    assert info["id"] == near["id"]
    assert hits[0]["id"] == near["dup_of"]  # the kept original is its nearest neighbour
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    kept_ids = set(read_json(full_run.index_ids))
    assert all(h["id"] in kept_ids for h in hits)
    # a kept image is not its own neighbour
    kept = next(d for d in decisions if d["kept"])
    hits2, _ = similar(full_run.root, kept["key"], k=3)
    assert kept["id"] not in [h["id"] for h in hits2] and len(hits2) == 3


def test_similar_cli_writes_sheet(full_run, tmp_path, capsys):
    out = tmp_path / "nn.png"
    kept = next(d for d in read_jsonl(full_run.decisions) if d["kept"])
    assert main(["inspect", str(full_run.root), "--similar", kept["key"], "-k", "4", "--sheet", str(out)]) == 0
    text = capsys.readouterr().out
    assert "neighbours of" in text and str(out) in text
    im = Image.open(out)
    assert im.format == "PNG" and im.width >= 5 * 150  # query + 4 neighbours in one row


def test_class_sheet_has_every_image_of_the_class(full_run, tmp_path):
    out = class_sheet(full_run.root, "coffee", tmp_path / "coffee.png")
    n = sum(d["class"] == "coffee" for d in read_jsonl(full_run.decisions))
    im = Image.open(out)
    cols = 10
    rows = math.ceil(n / cols)
    assert im.width == 10 + cols * (128 + 10)
    # title bar + rows of (thumb + caption) cells
    assert im.height > rows * 128 and im.height < (rows + 1) * 128 + 140
    # kept tiles carry a green accent bar under the thumbnail
    assert im.getpixel((10 + 5, 44 + 22 + 10 + 128 + 1)) == (22, 163, 74)


def test_selection_log_formats(tmp_path):
    """Key lists, "all" (kd/dfnd) and the bitmask over pool_keys.txt used for very large pools."""
    from pipeline.app.inspect import DistillRun

    keys = [f"{i:016x}" for i in range(10)]
    (tmp_path / "pool_keys.txt").write_text("\n".join(keys) + "\n")
    mask = int("".join("1" if i in (0, 3, 9) else "0" for i in range(10)), 2)
    rows = [{"epoch": 0, "selected_keys": [keys[1]]},
            {"epoch": 1, "selected_mask_hex": format(mask, "x"), "mask_order": "pool_keys.txt"}]
    dr = DistillRun("kd3-x", tmp_path, {"epochs": []}, rows)
    assert dr.selects and dr.selected_keys(keys) == {keys[0], keys[1], keys[3], keys[9]}
    everything = DistillRun("kd-x", tmp_path, {}, [{"epoch": 0, "selected_keys": "all"}])
    assert not everything.selects and everything.selected_keys(keys) == set(keys)
    (tmp_path / "pool_keys.txt").write_text("\n".join(keys[:4]) + "\n")
    with pytest.raises(DataError, match="mask has"):
        DistillRun("kd3-x", tmp_path, {}, rows).selected_keys(keys)


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    """`kd3 inspect` on a folder kd3 did not write: says so in one line, exit 2 (not a table of "missing:")."""
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    assert main(["inspect", str(tmp_path)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path} is not a run directory" in err[0] and "missing:" not in cap.out
