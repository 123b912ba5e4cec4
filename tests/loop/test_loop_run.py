"""The loop on a tiny query world: planned crawl (quotas, carry-over, resume), incremental curate, a
student warm-started on a grown pool, and a loop interrupted in its crawl or its distill then resumed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from crawlers.expand import PlannedQuery
from crawlers.stage import crawl, crawl_planned
from flows.loop import PLAIN, Stages, run_loop
from pipeline.core.records import read_loop_rounds, read_manifest, read_metrics, read_records
from pipeline.core.runs import RunDir
from pipeline.curate import curate


def ok_by_query(cfg, cls: str) -> Counter:
    return Counter(r.query for r in read_records(RunDir(cfg.run_dir).records) if r.cls == cls and r.status == "ok")


def test_planned_crawl_quotas_carry_over_and_resume(loop_cfg):
    cfg = loop_cfg()
    crawl(cfg, classes=["two"])
    assert ok_by_query(cfg, "two") == {"two": 7}  # the plain query of a starved class: 1 digit, 6 junk
    plan = [PlannedQuery("bing", "two", 3, base=7), PlannedQuery("bing", "two close-up", 2),
            PlannedQuery("bing", "handwritten two", 0)]
    crawl_planned(cfg, "two", plan, target=12)
    # "two" is dry: its 3 pass to "two close-up"; every download is recorded with its query
    assert ok_by_query(cfg, "two") == {"two": 7, "two close-up": 5}
    n = len(read_records(RunDir(cfg.run_dir).records))
    crawl_planned(cfg, "two", plan, target=12)  # a rerun (after a crash) counts the records: nothing more
    assert len(read_records(RunDir(cfg.run_dir).records)) == n
    # "two close-up" has 20 results: 15 more, the other 3 go to the next query
    crawl_planned(cfg, "two", [PlannedQuery("bing", "two close-up", 18, base=5),
                               PlannedQuery("bing", "handwritten two", 0)], target=30)
    assert ok_by_query(cfg, "two") == {"two": 7, "two close-up": 20, "handwritten two": 3}
    # the class stops at its target whatever the quotas say
    crawl_planned(cfg, "two", [PlannedQuery("bing", "handwritten two", 50, base=3)], target=33)
    assert sum(ok_by_query(cfg, "two").values()) == 33


def test_incremental_curate_embeds_only_the_new_images(loop_cfg):
    cfg = loop_cfg()
    crawl(cfg)
    m0 = curate(cfg)
    first = m0["stats"]["embed"]
    assert first["cached"] == 0 and first["computed"] > 0
    crawl_planned(cfg, "two", [PlannedQuery("bing", "handwritten two", 6)], target=7 + 6)
    m = curate(cfg)
    assert m["stats"]["embed"] == {**m["stats"]["embed"], "computed": 6, "cached": first["computed"]}
    # the decisions are made again over the whole pool: the new images are kept beside the old ones
    assert m["class_counts"]["two"] == m0["class_counts"]["two"] + 6
    assert read_manifest(RunDir(cfg.run_dir).manifest)["nsamples"] == m0["nsamples"] + 6


def test_warm_start_on_a_grown_pool(loop_cfg):
    import torch

    from distill.stage import distill

    cfg = loop_cfg(**{"distill.method": "dfnd"})
    crawl(cfg)
    curate(cfg)
    first = distill(cfg, out_id="a")
    crawl_planned(cfg, "two", [PlannedQuery("bing", "handwritten two", 6)], target=13)
    curate(cfg)
    # a near-zero step: the grown pool's run must start where the first one ended
    still = loop_cfg(**{"distill.method": "dfnd", "distill.lr": 1e-12, "distill.weight_decay": 0.0,
                        "distill.momentum": 0.0})
    ck = Path(cfg.run_dir) / "distill" / "dfnd-a" / "checkpoint.pt"
    second = distill(still, out_id="b", init_from=ck)
    assert second["init_from"] == str(ck)
    pool_a = (Path(cfg.run_dir) / "distill/dfnd-a/pool_keys.txt").read_text().split()
    pool_b = (Path(cfg.run_dir) / "distill/dfnd-b/pool_keys.txt").read_text().split()
    assert set(pool_a) < set(pool_b)
    # dfnd's one-off selection was made again over the grown pool
    assert second["epochs"][0]["selected"] == round(0.5 * len(pool_b)) != first["epochs"][0]["selected"]
    w_a = torch.load(ck, weights_only=True)["method"]
    w_b = torch.load(ck.parent.parent / "dfnd-b" / "checkpoint.pt", weights_only=True)["method"]
    conv = [k for k in w_a if k.endswith("weight") and w_a[k].dim() == 4]
    assert conv and all(torch.allclose(w_a[k], w_b[k], atol=1e-6) for k in conv)


class Interrupted(Exception):
    pass


def test_loop_interrupted_in_distill_resumes(loop_cfg):
    cfg = loop_cfg()

    def broken_distill(c, out_id, init):
        raise Interrupted("killed while distilling round 1")

    with pytest.raises(Interrupted):
        run_loop(cfg, Stages(PLAIN.crawl_class, PLAIN.curate, broken_distill))
    rd = RunDir(cfg.run_dir)
    rounds = read_loop_rounds(rd.loop)
    assert [(r.round, r.status) for r in rounds] == [(0, "done"), (1, "curated")]
    assert rounds[0].after.starved == ["two"] and list(rounds[1].plan) == ["two"]
    n_records = len(read_records(rd.records))
    rounds = run_loop(cfg)
    assert len(read_records(rd.records)) >= n_records
    r1 = rounds[1]
    assert r1.status == "done" and r1.added["two"]["downloaded"] == 8 and r1.added["two"]["kept"] > 0
    # the crawl of round 1 was not redone: round 1's downloads are exactly its budget
    assert sum(1 for r in read_records(rd.records)[:n_records] if r.status == "ok") == \
        sum(rounds[0].after.classes[c].downloaded for c in cfg.classes) + 8
    assert r1.after.classes["two"].selected > r1.before.classes["two"].selected
    metrics = read_metrics(Path(r1.distill_dir) / "metrics.json")
    assert metrics["init_from"] == str(Path(rounds[0].distill_dir) / "checkpoint.pt")
    assert len({r.distill_dir for r in rounds}) == len(rounds)
    assert rounds[-1].stop or rounds[-1].round == cfg.loop.rounds
    assert run_loop(cfg) == rounds  # done: a rerun changes nothing
    shows_the_loop(rd.root)


def shows_the_loop(run_dir: Path) -> None:
    """``kd3 inspect``: per round, per class kept, selected, yield and the queries tried with theirs."""
    import io
    import json
    from contextlib import redirect_stdout

    from pipeline.app.cli import main
    from pipeline.app.report import write_report

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["inspect", str(run_dir), "--json"]) == 0
    loop = json.loads(buf.getvalue())["loop"]
    assert [r["round"] for r in loop][:2] == [0, 1]
    two = next(c for c in loop[1]["classes"] if c["class"] == "two")
    assert two["starved"] in ("yes", "no") and "two close-up" in two[next(k for k in two if k.startswith("queries"))]
    assert "kd trains on every image" in loop[0]["title"]
    page = write_report(run_dir).read_text()
    assert 'id="loop"' in page and "two close-up" in page


def test_loop_interrupted_in_crawl_resumes_to_the_exact_budget(loop_cfg):
    cfg = loop_cfg(**{"loop.rounds": 1, "loop.min_selected": 1000, "loop.budget_per_round": 9})
    calls = []

    def crawl_then_die(c, name, plan, target):
        calls.append(name)
        if len(calls) == 2:  # the second class: part of its downloads, then the process dies
            crawl_planned(c, name, plan, target - 2)
            raise Interrupted("killed while crawling")
        return crawl_planned(c, name, plan, target)

    with pytest.raises(Interrupted):
        run_loop(cfg, Stages(crawl_then_die, PLAIN.curate, PLAIN.distill))
    rd = RunDir(cfg.run_dir)
    r1 = read_loop_rounds(rd.loop)[1]
    assert r1.status == "started" and set(r1.plan) == {"zero", "one", "two"}  # every class below 1000
    rounds = run_loop(cfg)
    got = Counter(r.cls for r in read_records(rd.records) if r.status == "ok")
    assert {c: got[c] for c in r1.targets} == r1.targets  # no class got more than its share
    assert rounds[1].status == "done" and sum(v["downloaded"] for k, v in rounds[1].added.items()
                                              if k != "kept_before") == 9
