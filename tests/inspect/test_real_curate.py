"""inspect on a run produced by the real curate stage (not the hand-written fixture)."""
from __future__ import annotations

from collections import Counter

from PIL import Image

from pipeline.app.cli import main
from pipeline.app.inspect import similar, summarize
from pipeline.core.io import read_json, read_jsonl
from pipeline.app.report import write_report
from pipeline.core.records import DROP_REASONS


def test_summary_equals_real_manifest(real_curated_run):
    rd = real_curated_run
    s = summarize(rd.root)
    m = read_json(rd.manifest)
    decisions = read_jsonl(rd.decisions)
    for c in m["classes"]:
        assert s["per_class"][c]["kept"] == m["class_counts"][c]
    assert s["totals"]["kept"] == m["nsamples"]
    stats = Counter()
    for st in m["stats"].values():
        stats.update(st.get("dropped") or {})
    for r in DROP_REASONS:
        assert s["totals"][r] == stats[r] == sum(d["reason"] == r for d in decisions), r
    assert s["totals"]["shards"] == len(m["shardlist"])
    assert s["missing"] == ["no distill runs (distill/*/metrics.json): run `kd3 distill`"]


def test_similar_image_file_uses_the_runs_embedder(real_curated_run, tmp_path, capsys):
    rd = real_curated_run
    kept = next(d for d in read_jsonl(rd.decisions) if d["kept"])
    # a copy outside the run, re-encoded: its nearest neighbour is the original
    q = tmp_path / "query.png"
    Image.open(rd.root / kept["path"]).save(q)
    hits, info = similar(rd.root, str(q), k=3)
    assert hits[0]["id"] == kept["id"] and hits[0]["score"] > 0.99
    # the pool's own file is decoded as curate decoded it: the very same embedding
    hits, _ = similar(rd.root, str(rd.root / kept["path"]), k=1)
    assert hits[0]["id"] == kept["id"] and hits[0]["score"] > 0.9999
    out = tmp_path / "nn.png"
    assert main(["inspect", str(rd.root), "--similar", str(q), "-k", "3", "--sheet", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert main(["inspect", str(rd.root), "--text", "a cat"]) == 2
    assert "needs real CLIP weights" in capsys.readouterr().err


def test_report_of_real_run(real_curated_run):
    path = write_report(real_curated_run.root)
    page = path.read_text(encoding="utf-8")
    n = len(read_jsonl(real_curated_run.decisions))
    assert page.count('<figure class="tile"') >= n
    assert "CLIP class scores" in page
