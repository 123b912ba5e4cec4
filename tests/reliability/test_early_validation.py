"""Validation before work (issue 13, items 3 and 7): what can be checked when the config loads is checked
then, before any folder is created; a refused distill leaves no `distill/<method>-<id>/` folder (nor its
train.log); a folder source with nothing usable ends with one `kd3: error:` line, exit 2."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline.app.cli import main
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError

from reliability_helpers import assert_one_line_error, kd3, load_module

art = load_module("tests/reliability/test_artifacts.py", "kd3_test_artifacts")
CLASSES = art.CLASSES


def _one_line(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln[:2].isdigit()]  # drop log lines (HH:MM:SS)
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("kd3: error: "), err
    return lines[0]


teacher = art.teacher  # the same module-scoped fixture: a cnn_tiny teacher of CLASSES


def _other_classes(run):
    man = json.loads((run / "manifest.json").read_text())
    man["classes"] = ["zero", "seven"]
    (run / "manifest.json").write_text(json.dumps(man))


REFUSALS = {  # case: (change to the run, extra flags, words of the error)
    "class_mismatch": (_other_classes, [], ["seven"]),
    "missing_shard": (art._delete, [], ["r-000000.tar", "missing"]),
    "sha_mismatch": (art._corrupt_byte, [], ["r-000000.tar", "sha256"]),  # found only by reading the shard
    "bad_method": (None, ["--method", "kd4"], ["kd4"]),
    "bad_student": (None, ["--student", "resnet19"], ["resnet19"]),
    "missing_eval_dir": (None, ["--eval-dir", "/nonexistent/eval"], ["/nonexistent/eval"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_distill_leaves_no_output_folder(tmp_path, capsys, teacher, case):
    change, flags, needles = REFUSALS[case]
    run = tmp_path / "runs" / "r"
    art._write_run(run)
    if change is not None:
        change(run)
    argv = ["distill", "--run", run, "--teacher", teacher, "--method", "kd", "--student", "cnn_tiny",
            "--epochs", "1", "--distill.device", "cpu", "--distill.workers", "0", "--distill.batch_size", "4",
            "--distill.val_fraction", "0", *flags]
    line = _one_line(capsys, argv)
    for n in needles:
        assert n in line, (n, line)
    left = sorted(p.relative_to(run).as_posix() for p in (run / "distill").rglob("*")) if (run / "distill").exists() else []
    assert not left, left


def test_distill_still_runs_when_everything_checks_out(tmp_path, capsys, teacher):
    run = tmp_path / "runs" / "r"
    art._write_run(run)
    assert main(["distill", "--run", str(run), "--teacher", str(teacher), "--method", "kd", "--student", "cnn_tiny",
                 "--epochs", "1", "--distill.device", "cpu", "--distill.workers", "0", "--distill.batch_size", "4",
                 "--distill.val_fraction", "0"]) == 0
    assert len(list(run.glob("distill/kd-*/student.pt"))) == 1


def test_teacher_and_classes_in_another_order_fail_when_the_config_loads(tmp_path, teacher):
    """kd3 refuses rather than reorders: the order is what the student's outputs mean."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "o", "runs_root": str(tmp_path / "runs"), "teacher": str(teacher),
                                   "classes": list(reversed(CLASSES)), "crawl": {"sources": ["bing"]}}))
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    msg = str(ei.value)
    assert "another order" in msg and "position 0: 'one'" in msg and "\n" not in msg
    assert_one_line_error(kd3("crawl", "--config", cfg), str(cfg), "another order")
    assert not (tmp_path / "runs").exists()  # refused before the crawl made anything
    with pytest.raises(ConfigError, match="seven"):
        load_config(None, {"teacher": str(teacher), "classes": ["zero", "seven"]})
    assert load_config(None, {"teacher": str(teacher), "classes": CLASSES}).resolved_classes() == CLASSES


@pytest.mark.parametrize("flags, needle", [
    (["--teacher", "{tmp}/missing.pt"], "missing.pt"),
    (["--teacher", "{teacher}", "--distill.eval_dir", "{tmp}/no-eval"], "no-eval"),
    (["--teacher", "{teacher}", "--set", "curate.clip_weights={tmp}/no-weights.pt"], "no-weights.pt"),
    (["--teacher", "{teacher}", "--crawl.sources", "urls"], "crawl.url_list"),
], ids=["missing_teacher", "missing_eval_dir", "missing_clip_weights", "url_source_without_list"])
def test_kd3_run_checks_every_stage_before_any_work(tmp_path, capsys, teacher, flags, needle):
    """A distill or curate setting that cannot work stops `kd3 run` before its crawl, not after."""
    flags = [f.format(tmp=tmp_path, teacher=teacher) for f in flags]
    line = _one_line(capsys, ["run", "--classes", ",".join(CLASSES), "--set", f"runs_root={tmp_path / 'runs'}",
                              "--crawl.sources", "bing", *flags])
    assert needle in line, line
    assert not (tmp_path / "runs").exists()


def test_empty_folder_source_is_one_line_exit_2(tmp_path):
    root = tmp_path / "tree"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    r = kd3("crawl", "--classes", ",".join(CLASSES), "--crawl.sources", "folder", "--crawl.folder", root,
            "--set", f"runs_root={tmp_path / 'runs'}")
    assert_one_line_error(r, f"crawl.folder {root}", "no files")
    assert not (tmp_path / "runs").exists()


def test_folder_of_non_images_is_one_line_exit_2(tmp_path):
    root = tmp_path / "tree"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        (root / c / "notes.txt").write_text("not an image\n")
        (root / c / "fake.jpg").write_bytes(b"<html>nope</html>")
    r = kd3("crawl", "--classes", ",".join(CLASSES), "--crawl.sources", "folder", "--crawl.folder", root,
            "--set", f"runs_root={tmp_path / 'runs'}")
    assert_one_line_error(r, f"crawl.folder {root}", "none of its 4 files is a usable image", "not_image 4")
