"""`kd3 demo` exports its web as a `<class>/*` tree (demo-out/world/web-tree/), so the guide's folder-source
recipe can be tried on the demo's own web (issue 13, item 12)."""
from collections import Counter

from kd3demo import world as dw
from kd3demo.webtree import export_web_tree

SPEC = dw.WorldSpec(seed=2, n_per_class=3, junk_fraction=0.67, dup_fraction=0.34, n_broken=1, train_per_class=4)


def test_web_tree_holds_what_each_query_serves_and_a_folder_crawl_reads_it(tmp_path):
    from crawlers.stage import crawl
    from pipeline.core.config import load_config
    from pipeline.core.io import read_jsonl

    world = dw.generate_world(tmp_path / "world", SPEC)
    tree = export_web_tree(world.root)
    assert tree == world.root / "web-tree"
    truth = read_jsonl(world.truth_path)
    files = Counter(p.relative_to(tree).parts[0] for p in tree.rglob("*") if p.is_file())
    assert files == Counter(r["query"] for r in truth) and set(files) == set(world.classes)
    assert not list(tree.rglob("truth.jsonl"))  # the ground truth stays aside
    assert export_web_tree(world.root) == tree  # idempotent
    cfg = load_config(None, {"name": "tree", "runs_root": str(tmp_path / "runs"), "classes": world.classes,
                             "crawl.sources": ["folder"], "crawl.folder": str(tree)})
    s = crawl(cfg)
    ok = sum(c["downloaded"] + c["duplicates"] for c in s["classes"].values())
    broken = sum(1 for r in truth if r["kind"].startswith("broken"))
    assert ok == len(truth) - broken  # every image of the web, taken whole (no per_class cap)


def test_demo_exports_the_tree():
    import inspect

    from kd3demo import demo

    assert "export_web_tree(world.root)" in inspect.getsource(demo.run_demo)
