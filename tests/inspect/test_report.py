"""The HTML report: well-formed, complete, self-contained; loaded in a real headless Chromium."""
from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.records import DropReason
from pipeline.core.io import read_json, read_jsonl
from pipeline.app.report import write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_SELF_CLOSING = {"line", "rect", "circle", "polyline", "path", "use", "g", "image", "stop"}  # matplotlib


def _load_cdp():
    spec = importlib.util.spec_from_file_location("kd3_test_cdp", Path(__file__).with_name("cdp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class StrictChecker(HTMLParser):
    """Every non-void element closed in order; collects <img src>, links, ids and visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.refs: list[str] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(a[k])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))
        for k in ("src", "href"):
            if dict(attrs).get(k):
                self.refs.append(dict(attrs)[k])
        if tag not in VOID and tag not in SVG_SELF_CLOSING:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check(html_text: str) -> StrictChecker:
    p = StrictChecker()
    p.feed(html_text)
    p.close()
    assert p.doctype, "no <!DOCTYPE html>"
    assert not p.errors, p.errors[:5]
    assert p.stack == [], f"unclosed: {p.stack}"
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    return p


def test_report_is_complete_and_self_contained(full_run):
    path = write_report(full_run.root)
    assert path == full_run.report / "index.html"
    page = path.read_text(encoding="utf-8")
    p = _check(page)
    text = " ".join(p.text)
    # no network: every src/href is a local relative file or an in-page anchor/data URI
    for ref in p.refs:
        assert not re.match(r"^([a-z]+:)?//", ref), ref
        if not ref.startswith(("#", "data:")):
            assert (path.parent / ref).is_file(), ref
    for src in p.imgs:
        assert src.startswith("thumbs/") and Image.open(path.parent / src).size[0] > 0
    m = read_json(full_run.manifest)
    decisions = read_jsonl(full_run.decisions)
    for sec in ("Stage funnel", "Per-class counts", "Contact sheets", "Duplicate groups", "CLIP class scores",
                "Distillation"):
        assert sec in text
    for c in m["classes"]:
        assert c in text
    for reason in {d["reason"] for d in decisions if d["reason"]}:
        assert DropReason(reason).label in text
    # one tile per decision in the contact sheets (all fit under the default limits)
    n_tiles = page.count('<figure class="tile"')
    groups = defaultdict(list)
    for d in decisions:
        if d["dup_of"]:
            groups[d["dup_of"]].append(d)
    n_dup_tiles = sum(1 + len(v) for v in groups.values())
    pool = {d["key"] for d in decisions if d["kept"]}
    chosen = set()
    for row in read_jsonl(full_run.distill / "kd3-fixture" / "selection.jsonl"):
        chosen.update(row["selected_keys"])
    never = pool - chosen
    assert len(never) > 0
    assert n_tiles == len(decisions) + n_dup_tiles + len(never)
    assert page.count('class="dupgroup"') == len(groups)
    assert f'never selected <span class="count">{len(never)}</span>' in page
    for k in never:
        assert k in page
    # charts (matplotlib, inline SVG): funnel, class-score histograms, the runs compared, per run the selection
    # and accuracy per epoch, + the confusion matrix where the run has one (kd3)
    assert page.count("<svg") == 1 + 1 + 1 + 2 * 2 + 1
    assert page.count('class="chart mpl"') == page.count("<svg")
    assert "kd3 selects nothing" not in page and "kd selects nothing" in page


def test_distill_section_names_the_teacher_compares_runs_and_counts_by_the_right_label(full_run):
    """Issue 13 item 5: kd3 counts selected images by teacher label, so the chart says so and the shares
    are out of the pool images with that label; the teacher is `arch · N classes · top-1`, not a dict."""
    page = write_report(full_run.root).read_text(encoding="utf-8")
    text = " ".join(_check(page).text)
    kd3 = page[page.index('id="distill-kd3-fixture"'):]
    assert "selected per epoch, by teacher label" in kd3 and "cat 11/12" in kd3
    kd = page[page.index('id="distill-kd-fixture"'):page.index('id="distill-kd3-fixture"')]
    assert "selected per epoch, by query label" in kd and "cat 8/8" in kd
    assert "teacher cnn_small · 3 classes · top-1 85.0%" in text and "input_size" not in page and "'arch'" not in page
    assert "every distill run of this run, side by side" in text
    table = page[page.index('class="counts compare"'):]
    table = table[:table.index("</table>")]
    for cell in ("kd3-fixture", "kd-fixture", "70.0%", "55.0%", "85.0%", "80.0%", "60.0%", "83.3%", "100.0%"):
        assert f"<td>{cell}</td>" in table, cell
    assert "confusion matrix" in kd3 and "confusion matrix" not in kd  # kd-fixture has no eval_dir matrix


def test_teacher_confidence_histograms_without_clip_scores(full_run, tmp_path):
    import shutil

    from pipeline.core.io import write_jsonl_atomic

    root = tmp_path / "noclip"
    shutil.copytree(full_run.root, root)
    rows = read_jsonl(root / "curate" / "decisions.jsonl")
    for k, r in enumerate(rows):
        r.update(clip_scores=None, clip_top=None, teacher_conf=None if r["reason"] in ("invalid", "bomb") else
                 round(0.3 + 0.6 * ((k * 37) % 100) / 100, 3))
    write_jsonl_atomic(root / "curate" / "decisions.jsonl", rows)
    page = write_report(root).read_text(encoding="utf-8")
    text = " ".join(_check(page).text)
    assert "Teacher confidence" in text and "CLIP class scores" not in text
    assert 'aria-label="teacher confidence"' in page and "no CLIP scores in the decisions" not in text


@pytest.mark.parametrize("which", ["full_run", "crawl_only_run"])
def test_the_report_reads_records_and_decisions_a_row_at_a_time(which, request, tmp_path):
    """The report streams the decisions (and the records of classes not curated yet) instead of holding a
    pool's 10^6 rows, and renders the same page as from the rows loaded."""
    from pipeline.app.inspect import Run
    from pipeline.app.report import render_html

    root = request.getfixturevalue(which).root
    def page(run) -> str:  # without the time it was made and the charts' per-process id numbers
        html = re.sub(r"generated by kd3 inspect · [^<]*", "", render_html(run, tmp_path / "a"))
        return re.sub(r"\bc\d+-", "c-", html)

    run = Run(root)
    streamed = page(run)
    assert "records" not in run.__dict__ and "decisions" not in run.__dict__
    loaded = Run(root)
    assert len(loaded.records) + len(loaded.decisions) > 0  # loaded first: the report walks the lists
    assert page(loaded) == streamed


def test_partial_run_report(crawl_only_run):
    path = write_report(crawl_only_run.root)
    page = path.read_text(encoding="utf-8")
    p = _check(page)
    text = " ".join(p.text)
    assert "Partial run" in text and "not curated yet" in text
    assert "Duplicate groups" not in text
    n_ok = sum(r["status"] == "ok" for r in read_jsonl(crawl_only_run.records))
    assert page.count('<figure class="tile"') == n_ok


@pytest.fixture(scope="module")
def chromium():
    cdp = _load_cdp()
    binary = cdp.find_chromium()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install chromium): browser check of the report skipped")
    with cdp.Chromium(binary) as ch:
        yield ch


def _assert_loads_clean(ch, path: Path, shot: Path) -> dict:
    res = ch.load(path.resolve().as_uri(), screenshot=shot)
    assert res["console_errors"] == []
    assert res["failed_requests"] == []
    assert all(u.startswith(("file:", "data:")) for u in res["requests"]), res["requests"]
    assert res["external"] == []
    bad = [i for i in res["images"] if i["w"] <= 0]
    assert not bad, bad[:3]
    im = Image.open(shot)
    assert im.format == "PNG" and im.width == 1280 and im.height == min(res["height"], 16000)
    return res


def test_report_in_headless_chromium(full_run, chromium, tmp_path):
    path = write_report(full_run.root)
    page = path.read_text(encoding="utf-8")
    res = _assert_loads_clean(chromium, path, tmp_path / "report.png")
    assert len(res["images"]) == page.count("<img ") > 30
    assert res["title"] == "kd3 report · fixture"
    assert res["svgs"] == page.count("<svg")
    assert res["sections"][:3] == ["Stage funnel", "Per-class counts", "Contact sheets"]
    assert res["spill"] == []  # every line, bar and label inside its own chart
    # the screenshot is not blank: the header band is blue, thumbnails are colourful
    im = Image.open(tmp_path / "report.png").convert("RGB")
    r, g, b = im.getpixel((20, 20))
    assert b > r + 40
    assert len(set(im.crop((0, 0, 1280, 1500)).resize((128, 150)).getdata())) > 500


def test_partial_report_in_headless_chromium(crawl_only_run, chromium, tmp_path):
    path = write_report(crawl_only_run.root)
    res = _assert_loads_clean(chromium, path, tmp_path / "partial.png")
    assert len(res["images"]) == sum(r["status"] == "ok" for r in read_jsonl(crawl_only_run.records))


def test_cli_starts_without_matplotlib():
    """matplotlib is imported where a chart is drawn, so `kd3 --help` and terminal inspect stay fast."""
    import subprocess
    import sys

    code = "import sys, pipeline.app.cli, pipeline.app.report; assert 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
