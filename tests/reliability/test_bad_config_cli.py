"""Bad configuration at the CLI level: the real `kd3` executable (a few) and `pipeline.app.cli.main` in-process
(the rest) end with exactly one `kd3: error: ...` line naming the culprit, exit 2, no traceback.
(tests/foundation/test_config.py covers load_config at the API level; these are the user's view.)"""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline.app.cli import main
from pipeline.core.io import read_jsonl

from reliability_helpers import assert_one_line_error, kd3


def _in_process(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln[:2].isdigit()]  # drop log lines (HH:MM:SS)
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("kd3: error: "), err
    return lines[0]


def test_unknown_key_in_yaml_subprocess(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["cat"], "crawl": {"per_klass": 5}}))
    assert_one_line_error(kd3("crawl", "--config", cfg), str(cfg), "crawl.per_klass: unknown key")


def test_wrong_type_flag_subprocess(tmp_path):
    r = kd3("crawl", "--classes", "cat", "--crawl.per_class", "lots", "--set", f"runs_root={tmp_path}")
    assert_one_line_error(r, "crawl.per_class", "integer")
    assert not (tmp_path / "default").exists()  # nothing written for a refused config


def test_nul_in_class_name_subprocess(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('classes: ["cat", "ca\\0t"]\n')  # YAML escape: a real NUL byte in the name
    assert_one_line_error(kd3("crawl", "--config", cfg), "NUL", str(cfg))


def test_missing_teacher_subprocess(tmp_path):
    # no class list given: the classes come from the teacher, which must exist
    r = kd3("crawl", "--teacher", tmp_path / "nope.pt", "--set", f"runs_root={tmp_path}")
    assert_one_line_error(r, str(tmp_path / "nope.pt"), "does not exist")


def test_empty_classes_file_names_the_file(tmp_path, capsys):
    f = tmp_path / "classes.txt"
    f.write_text("# nothing here\n\n")
    line = _in_process(capsys, ["crawl", "--classes-file", f, "--set", f"runs_root={tmp_path}"])
    assert str(f) in line


@pytest.mark.parametrize("argv, needles", [
    (["--set", "crawl.bogus=1", "--classes", "cat"], ["crawl.bogus: unknown key"]),
    (["--set", "bogus_top=1", "--classes", "cat"], ["bogus_top: unknown key"]),
    (["--crawl.threads", "-1", "--classes", "cat"], ["crawl.threads", "greater than 0"]),
    (["--crawl.per_class", "0", "--classes", "cat"], ["crawl.per_class", "greater than 0"]),
    (["--crawl.retries", "-2", "--classes", "cat"], ["crawl.retries"]),
    (["--crawl.max_bytes", "1.5", "--classes", "cat"], ["crawl.max_bytes", "integer"]),
    (["--crawl.sources", "bing,altavista", "--classes", "cat"], ["crawl.sources"]),
    (["--classes", "cat,dog,cat"], ["listed twice", "cat"]),
    (["--classes", ""], ["no classes"]),
    (["--classes", "x" * 300], ["longer than 200", "xxxx"]),
    (["--set", "crawl.allowed_networks=[not-a-net]", "--classes", "cat"], ["not-a-net"]),
    (["--set", "name=../escape", "--classes", "cat"], ["../escape", "plain folder name"]),
])
def test_bad_flags_in_process(tmp_path, capsys, argv, needles):
    line = _in_process(capsys, ["crawl", *argv, "--set", f"runs_root={tmp_path}"])
    for n in needles:
        assert n in line, (n, line)
    assert not any(tmp_path.iterdir())  # nothing written


def test_curate_and_distill_missing_teacher_in_process(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    line = _in_process(capsys, ["distill", "--run", run, "--classes", "cat", "--teacher", tmp_path / "gone.pt"])
    assert "gone.pt" in line or "manifest" in line  # the first missing input is named
    (run / "manifest.json").write_text(json.dumps({"shardlist": [], "classes": ["cat"]}))
    line = _in_process(capsys, ["distill", "--run", run, "--classes", "cat", "--teacher", tmp_path / "gone.pt"])
    assert str(tmp_path / "gone.pt") in line


def test_path_like_and_unicode_class_names_stay_inside_the_run(tmp_path, fw, crawl_helpers):
    """`../`, `/` and unicode class names are accepted as names, never as paths: a real `kd3 crawl`
    writes only under runs/<name>/, records keep the original names."""
    classes = ["../../escape", "a/b", "猫 chat"]
    for c, term in zip(classes, ["escape", "a/b", "猫"]):
        crawl_helpers.add_images(fw, term, 2, seed0=len(term) * 10)
    outside = tmp_path / "outside"
    runs = outside / "deep" / "runs"
    runs.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "names", "runs_root": str(runs), "classes": classes}, allow_unicode=True))
    before.add(cfg)
    r = kd3("crawl", "--config", cfg, "--crawl.sources", "bing", "--crawl.engine_urls.bing", fw.base_url,
            "--crawl.allow_private_hosts", "--crawl.per_class", "2", "--crawl.rate_limit_per_domain", "1000",
            "--crawl.query_templates", "{c}", cwd=outside / "deep")
    assert r.returncode == 0, r.stderr[-3000:]
    created = {p for p in tmp_path.rglob("*")} - before
    run = runs / "names"
    stray = [p for p in created if p != run and run not in p.parents]
    assert stray == [], stray
    rows = read_jsonl(run / "crawl" / "records.jsonl")
    assert {r["class"] for r in rows if r["status"] == "ok"} == set(classes)
    for r in rows:
        if r["path"]:
            assert (run / r["path"]).resolve().is_relative_to(run.resolve())
    summary = json.loads((run / "crawl" / "summary.json").read_text())
    assert set(summary["classes"]) == set(classes)
