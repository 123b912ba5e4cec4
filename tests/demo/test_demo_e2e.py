"""`kd3 demo --size tiny` end to end (world, teacher, fake web, Prefect flow, kd/dfnd, report).

30-90 s on 2 shared CPU cores (Prefect's temporary server alone takes ~15 s): marked slow."""
import os

import pytest

from pipeline.app.cli import main


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--out", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    for m in ("kd3", "kd", "dfnd"):
        assert f"\n{m} " in printed
    from pipeline.core.io import read_json, read_jsonl

    res = read_json(out / "results.json")
    assert [m["method"] for m in res["methods"]] == ["kd3", "kd", "dfnd"]
    assert all(0 <= m["top1"] <= 1 and m["teacher_top1"] == res["teacher_top1"] for m in res["methods"])
    run = out / "runs" / "digits"
    recs = read_jsonl(run / "crawl" / "records.jsonl")
    assert {r["engine"] for r in recs} == {"bing"}
    # the junk the fake web served under each query reached curate, labelled by its query
    assert sum(v.get("kept", 0) for k, v in res["curate"].items() if k in ("letter", "shape", "photo", "noise")) > 0
    assert all(v.get("kept", 0) == 0 for k, v in res["curate"].items() if k.startswith("broken"))
    assert res["report"] and os.path.isfile(res["report"])
    assert f"report: {res['report']}" in printed
