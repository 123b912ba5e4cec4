"""What kd3 prints by default: its own lines (and progress bars); other libraries' INFO only with -v
(issue 13, item 9)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from reliability_helpers import REPO, kd3, load_module

art = load_module("tests/reliability/test_artifacts.py", "kd3_test_artifacts")
teacher = art.teacher  # a module-scoped fixture: a cnn_tiny teacher of art.CLASSES
OWN = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG) (kd3|pipeline|crawlers|distill|flows)[.:]")
ANY_INFO = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG) (\S+):")


def _curate(tmp_path, *extra):
    ff = load_module("tests/reliability/test_faults_flow.py", "kd3_faults_flow")
    folder = tmp_path / "digits"
    if not folder.is_dir():
        ff._digits_folder(folder)
    (tmp_path / "runs" / "q").mkdir(parents=True)
    return kd3("curate", "--set", "name=q", "--set", f"runs_root={tmp_path / 'runs'}", "--set",
               f"crawl.folder={folder}", "--classes", ",".join(ff.CLASSES), "--curate.embed_backend", "clip",
               "--curate.clip_model", "kd3-tiny-clip", "--set", "curate.clip_pretrained=null",
               "--curate.device", "cpu", "--curate.workers", "0",
               "--no-curate.near_dup",  # random weights: a calibrated near-dup cut is refused
               *extra, timeout=300)


def test_default_output_is_kd3s_own_lines_and_v_adds_the_rest(tmp_path):
    r = _curate(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = [ln for ln in r.stderr.splitlines() if ANY_INFO.match(ln)]
    assert info and all(OWN.match(ln) for ln in info), [ln for ln in info if not OWN.match(ln)]
    for noise in ("faiss.loader", "AVX", " root:", "Instantiating model"):  # open_clip logs on the root logger
        assert noise not in r.stderr, noise
    import shutil

    shutil.rmtree(tmp_path / "runs")
    v = _curate(tmp_path, "-v")
    assert v.returncode == 0, v.stderr[-3000:]
    assert "INFO faiss.loader:" in v.stderr and "INFO root:" in v.stderr


def test_routine_third_party_warnings_only_with_v(capfd):
    """Hugging Face logs every retry of a download it cannot make and open_clip repeats the failure on
    the root logger; kd3's own one-line error says it once."""
    from pipeline.core.logs import setup_logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("huggingface_hub").level)
    try:
        for verbose in (0, 1):
            setup_logging("INFO", verbose)
            capfd.readouterr()
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
            logging.getLogger().error("Failed to download weights for tag 'x'")
            logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:4200/api/health")
            logging.getLogger("prefect.client").warning("a Prefect warning stays visible")
            logging.getLogger("kd3.crawl").info("kd3's own line")
            err = capfd.readouterr().err
            assert "kd3's own line" in err and "a Prefect warning stays visible" in err
            for noisy in ("Retrying in 8s", "Failed to download", "HTTP Request"):
                assert (noisy in err) == bool(verbose), (verbose, noisy, err)
    finally:
        for h in list(root.handlers):
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
        logging.getLogger("huggingface_hub").setLevel(before[2])


def test_offline_clip_error_is_one_line_not_cut_mid_word():
    from pipeline.core.errors import ConfigError, one_line
    from pipeline.curate.embed import ClipEmbedder

    assert one_line("alpha beta gamma delta", 12) == "alpha beta…"
    assert one_line("first line\nsecond", 200) == "first line"
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (tests never download)")
    with pytest.raises(ConfigError) as ei:
        ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", None, "cpu")
    msg = str(ei.value)
    assert "\n" not in msg and msg.endswith("curate.embed_backend: teacher")
    cause = msg[msg.index("(") + 1: msg.rindex(")")]
    assert cause.endswith("…") or cause[-1].isalnum() or cause[-1] in ".'\"", cause
    if cause.endswith("…"):
        assert cause[-2] != " " and len(cause) <= 161


def test_distill_workers_are_clamped_to_the_cores_it_may_use(tmp_path, teacher):
    """distill.workers 4 on a 1-core affinity: 1 loader worker, a note, no torch DataLoader warning."""
    run = tmp_path / "runs" / "w"
    art._write_run(run)
    exe = [str(sys.executable), "-m", "pipeline.app.cli"]
    r = subprocess.run(exe + ["distill", "--run", str(run), "--classes", ",".join(art.CLASSES), "--teacher",
                              str(teacher), "--method", "kd", "--student", "cnn_tiny", "--epochs", "1",
                              "--distill.device", "cpu", "--distill.workers", "4", "--distill.batch_size", "4",
                              "--distill.val_fraction", "0"],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       preexec_fn=lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distill.workers 4 > 1 CPU cores available: using 1" in r.stderr
    assert "DataLoader will create" not in r.stderr, r.stderr[-2000:]
