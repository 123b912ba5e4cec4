"""The crawl-selection loop against a no-loop run with the same crawl budget (issue 15).

Per seed, on a query world of the demo (``--query-world``; ``loop``: two classes, ``two`` and ``six``, rare
on the web and mostly junk under their plain query; ``loop-hard``: the same with ``seven`` and ``nine``, the
classes a student learns worst without digits of their own; every class also answers "{c} close-up",
"{c} isolated on white" and "handwritten {c}" with other mixes):

1. world, teacher (as ``kd3 demo``), the fake web (each image listed under exactly its query);
2. **round 0**, shared: crawl the plain query of every class, curate, distill ``--epochs``;
3. **loop**: ``--rounds`` rounds of ``flows.loop`` (the code ``kd3 run --loop N`` runs, here without Prefect):
   ``--budget`` downloads per round for the starved classes, curate, distill ``--epochs-per-round`` more
   epochs from the last student (``--distill continue``) or ``--epochs`` from scratch (``restart``);
4. **no loop**, same budget: a copy of round 0 downloads exactly as many images as the loop did, spread
   equally over every class and, within a class, over the same new query templates (no feedback), then
   curates and distills once, as many epochs as the loop's rounds together (continue: from round 0's
   student; restart: ``--epochs`` from scratch).

Printed per seed and as mean ± std with the paired loop - no-loop difference and its 95% t-interval: the
starved classes' selected counts (mean of the last epochs) and their student top-1 on the held-out
original digits, overall top-1, downloads (equal by construction), and from the world's ground truth what
each round added to the starved classes (kept real digits, scan-like ones, junk).

    .venv/bin/python bench/loop.py                                  # small world, seeds 0,1,2
    .venv/bin/python bench/loop.py --size tiny --seeds 0 --epochs 2 --epochs-per-round 1   # a smoke look
    .venv/bin/python bench/loop.py --query-world loop-hard --method kd --out bench-out/loop-hard-kd
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import mean_std, paired  # noqa: E402
from benchlib import format_machine, machine, quiet_logging  # noqa: E402

from crawlers.expand import PlannedQuery, split_budget  # noqa: E402
from crawlers.stage import crawl_planned  # noqa: E402
from distill.stage import distill, output_dir  # noqa: E402
from flows.loop import measure, round_config, run_loop  # noqa: E402
from kd3demo import world as dw  # noqa: E402
from kd3demo.demo import DemoSettings, _key_values, _resolved, demo_config, train_demo_teacher  # noqa: E402
from kd3demo.scoring import truth_by_sha  # noqa: E402
from kd3demo.fakeweb import FakeWeb  # noqa: E402
from pipeline.core.config import RunConfig  # noqa: E402
from pipeline.core.io import atomic_write_json, read_jsonl  # noqa: E402
from pipeline.core.records import downloads_per_class, read_decisions, read_loop_rounds, read_metrics  # noqa: E402
from pipeline.core.runs import RunDir  # noqa: E402
from pipeline.curate import curate  # noqa: E402

LOOP_TEMPLATES = ["{c} close-up", "{c} isolated on white", "handwritten {c}"]


def kept_by_kind(cfg: RunConfig, truth: dict, classes: list[str]) -> dict[str, dict[str, int]]:
    """Per class, the kept images by ground-truth kind: digit (scan-like or web-styled), junk."""
    out = {c: {"digit_scan": 0, "digit_web": 0, "junk": 0} for c in classes}
    for d in read_decisions(RunDir(cfg.run_dir).decisions):
        if not d.kept or d.cls not in out:
            continue
        t = truth.get(d.id) or {}
        kind = t.get("params", {}).get("of_kind") or t.get("kind")
        if kind == "digit" and t.get("truth") == d.cls:
            scan = (t.get("params") or {}).get("background") == "scan"
            out[d.cls]["digit_scan" if scan else "digit_web"] += 1
        else:
            out[d.cls]["junk"] += 1
    return out


def downloads(cfg: RunConfig) -> int:
    return sum(downloads_per_class(RunDir(cfg.run_dir).records).values())


def uniform_spend(cfg: RunConfig, budget: int) -> None:
    """The no-loop crawl: ``budget`` downloads spread equally over the classes and, within a class,
    over the loop's new templates (round-robin, what one query cannot give passes to the next)."""
    classes = cfg.resolved_classes()
    have = downloads_per_class(RunDir(cfg.run_dir).records)
    for c, share in split_budget(budget, classes).items():
        qs = [t.replace("{c}", c) for t in cfg.loop.query_templates]
        quotas = split_budget(share, qs)
        crawl_planned(cfg, c, [PlannedQuery("bing", q, quotas[q]) for q in qs], have.get(c, 0) + share)


def final(method_dir: Path) -> dict:
    return read_metrics(Path(method_dir) / "metrics.json").get("final") or {}


def summarise(cfg: RunConfig, method_dir: Path, starved: list[str], truth: dict) -> dict:
    f = final(method_dir)
    y = measure(cfg, method_dir)
    per = f.get("eval_top1_per_class") or {}
    return {"dir": str(method_dir), "top1": f.get("top1"), "downloads": downloads(cfg),
            "selected": {c: y.classes[c].selected for c in y.classes}, "kept": {c: y.classes[c].kept for c in y.classes},
            "top1_per_class": per, "starved_top1": statistics.fmean(per[c] for c in starved) if per else None,
            "starved_selected": sum(y.classes[c].selected for c in starved),
            "kinds": kept_by_kind(cfg, truth, list(y.classes))}


def baseline(cfg: RunConfig, loop_dirs: list[str], budget: int, a, starved: list[str], truth: dict) -> dict:
    """A copy of round 0 that spends ``budget`` without feedback, then distills once."""
    base = cfg.model_copy(update={"name": cfg.name + "-noloop"})
    base = RunConfig.model_validate(base.model_dump())
    src, dst = Path(cfg.run_dir), Path(base.run_dir)
    if not (dst / "manifest.json").is_file() or not (dst / ".spent").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src / "round0", dst)
        uniform_spend(base, budget)
        (dst / ".spent").write_text(str(budget))
    curate(base)
    rounds = len(loop_dirs) - 1
    if a.distill == "continue":
        bcfg = round_config(base.model_copy(update={"loop": base.loop.model_copy(
            update={"epochs_per_round": a.epochs_per_round * max(1, rounds)})}))
        init = Path(loop_dirs[0]).relative_to(src)
        res = distill(bcfg, out_id="noloop", resume=True, init_from=dst / init / "checkpoint.pt")
    else:
        bcfg = base
        res = distill(bcfg, out_id="noloop", resume=True)
    return summarise(base, Path(res.get("out_dir") or output_dir(bcfg, "noloop")), starved, truth)


def loop_config(cfg: RunConfig, a, rounds: int) -> RunConfig:
    d = cfg.model_dump()
    d["loop"].update(rounds=rounds, budget_per_round=a.budget, query_templates=LOOP_TEMPLATES, distill=a.distill,
                     epochs_per_round=a.epochs_per_round if a.distill == "continue" else None,
                     last_epochs=a.last_epochs)
    return RunConfig.model_validate(d)


def run_seed(seed: int, a) -> dict:
    out = (Path(a.out) / f"seed{seed}").resolve()
    s = _resolved(DemoSettings(out=out, size=a.size, seed=seed, epochs=a.epochs, methods=[a.method], report=False,
                               overrides=_key_values(a.set, "--set")))
    world = dw.generate_world(out / "world", dw.spec_for(a.size, seed=seed, query_world=a.query_world))
    teacher = train_demo_teacher(world, out, s.teacher_arch, s.teacher_epochs, seed, s.batch_size)
    truth_rows = read_jsonl(world.truth_path)
    truth = truth_by_sha(truth_rows)
    plain = dw.composition(truth_rows)
    per_query = max(sum(plain[c].values()) for c in dw.DIGIT_NAMES)
    res: dict = {"seed": seed, "rounds": []}
    with FakeWeb() as web:
        dw.register_on_fakeweb(web, world.pool(), exact=True)
        cfg0 = demo_config(s, world, teacher, web.engine_urls()["bing"], per_query)
        for r in range(a.rounds + 1):
            cfg = loop_config(cfg0, a, r)
            t = time.time()
            rounds = run_loop(cfg)
            snap = Path(cfg.run_dir) / "round0"
            if r == 0 and not snap.is_dir():  # the shared start, for the no-loop run
                shutil.copytree(cfg.run_dir, snap.with_suffix(".tmp"), ignore=shutil.ignore_patterns("round0*", ".prefect"))
                snap.with_suffix(".tmp").rename(snap)
            last = rounds[-1]
            if last.round < r:  # the loop stopped early
                break
            res["rounds"].append({"round": last.round, "stop": last.stop, "time_s": round(time.time() - t, 1),
                                  "starved": last.after.starved if last.after else [],
                                  "plan": last.plan, "added": last.added,
                                  "kinds": kept_by_kind(cfg, truth, cfg.resolved_classes())})
        rounds = read_loop_rounds(RunDir(cfg.run_dir).loop)
        starved = list(dw.QUERY_WORLDS[a.query_world]["starved"])  # the world's; the loop finds its own
        dirs = [r.distill_dir for r in rounds]
        res["starved"], res["detected"] = starved, rounds[0].after.starved
        res["loop"] = summarise(cfg, Path(dirs[-1]), starved, truth)
        round0 = Path(cfg.run_dir) / "round0" / "crawl" / "records.jsonl"
        spent = res["loop"]["downloads"] - sum(downloads_per_class(round0).values())
        res["budget_spent"] = spent
        res["noloop"] = baseline(cfg, dirs, spent, a, starved, truth)
    return res


def report(results: list[dict]) -> list[str]:
    lines = []
    starved = results[0]["starved"]
    head = (f"{'seed':>4}  {'arm':<7} {'rounds':>6} {'downloads':>9}  {'selected (starved)':>18}  "
            + "".join(f"{'top-1 ' + c:>10}  " for c in starved) + f"{'top-1 all':>9}")
    lines += [head, "-" * len(head)]
    for r in results:
        for arm in ("noloop", "loop"):
            m = r[arm]
            n = len(r["rounds"]) - 1 if arm == "loop" else 0
            lines.append(f"{r['seed']:>4}  {arm:<7} {n:>6} {m['downloads']:>9}  {m['starved_selected']:>18.1f}  "
                         + "".join(f"{100 * m['top1_per_class'].get(c, 0):>9.2f}%  " for c in starved)
                         + f"{100 * (m['top1'] or 0):>8.2f}%")
    lines.append("")
    for key, label, scale in (("starved_selected", "selected, starved classes", 1.0),
                              ("starved_top1", "top-1 on the starved classes", 100.0), ("top1", "top-1 overall", 100.0)):
        lo = [r["loop"][key] * scale for r in results]
        no = [r["noloop"][key] * scale for r in results]
        (ml, sl), (mn, sn) = mean_std(lo), mean_std(no)
        d, dlo, dhi = paired(lo, no)
        lines.append(f"{label:<30} loop {ml:7.2f} ± {sl:5.2f}   no loop {mn:7.2f} ± {sn:5.2f}   "
                     f"paired diff {d:+7.2f} [95% CI {dlo:+.2f}, {dhi:+.2f}]")
    lines.append(f"starved classes of the world: {', '.join(starved)}; detected after round 0: "
                 + "; ".join(f"seed {r['seed']} {', '.join(r['detected']) or 'none'}" for r in results))
    for r in results:
        added = []
        for rr in r["rounds"]:
            k = {c: rr["kinds"][c] for c in starved}
            added.append(f"r{rr['round']}: " + ", ".join(f"{c} scan {k[c]['digit_scan']} web {k[c]['digit_web']} "
                                                          f"junk {k[c]['junk']}" for c in starved))
        lines.append(f"seed {r['seed']} kept by kind after each round: " + " | ".join(added))
        asked = [f"r{rr['round']}: " + ", ".join(f"{p['query']} {p['quota']}" for c in starved[:1]
                                                  for p in rr["plan"].get(c, []) if p["quota"])
                 for rr in r["rounds"] if rr["plan"]]
        stop = r["rounds"][-1].get("stop") or "rounds done"
        lines.append(f"seed {r['seed']} {starved[0]} asked " + " | ".join(asked) + f"; stop: {stop}")
        nk = {c: r["noloop"]["kinds"][c] for c in starved}
        lines.append(f"seed {r['seed']} no loop kept: " + ", ".join(
            f"{c} scan {nk[c]['digit_scan']} web {nk[c]['digit_web']} junk {nk[c]['junk']}" for c in starved))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=sorted(dw.SIZES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--query-world", default="loop", choices=sorted(dw.QUERY_WORLDS),
                    help="the demo's query world (demo/kd3demo/world.py QUERY_WORLDS): which classes are rare on the web")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=40, help="downloads per loop round")
    ap.add_argument("--method", default="kd3")
    ap.add_argument("--epochs", type=int, default=60, help="round 0 (and restart rounds)")
    ap.add_argument("--epochs-per-round", type=int, default=20, help="each continue round")
    ap.add_argument("--distill", choices=["continue", "restart"], default="continue")
    ap.add_argument("--last-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/loop"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override for both arms, e.g. --set distill.kd3.selection_rule=confidence")
    a = ap.parse_args(argv)
    quiet_logging()
    logging.getLogger("kd3.loop").setLevel(logging.INFO)
    results = []
    t0 = time.time()
    for seed in [int(x) for x in a.seeds.split(",") if x.strip()]:
        done = a.out / f"seed{seed}" / "result.json"  # a finished seed is reused (seeds may run in parallel)
        if not done.is_file():
            atomic_write_json(done, run_seed(seed, a))
        results.append(json.loads(done.read_text()))
        atomic_write_json(a.out / f"loop-{a.size}.json", {"args": {k: str(v) for k, v in vars(a).items()},
                                                          "machine": machine(), "results": results})
    lines = [f"loop bench: {a.size} world ({a.query_world}), seeds {a.seeds}, {a.method}, {a.rounds} rounds x "
             f"{a.budget} downloads, "
             f"distill {a.distill} ({a.epochs} + {a.epochs_per_round}/round epochs), {time.time() - t0:.0f}s",
             format_machine()] + report(results)
    print("\n".join(lines))
    (a.out / f"loop-{a.size}.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
