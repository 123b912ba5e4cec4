"""End to end on a tiny digits teacher and a 240-image web pool written as shards: each method, 2 epochs."""
import json
import shutil

import numpy as np
import pytest
import torch

from distill.stage import distill, output_dir
from distill.teacher import load_teacher
from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.core.io import read_json, read_jsonl
from pipeline.core.records import SelectionRow
from testlib import Crash, crash_after_first

torch.set_num_threads(1)


def _cfg(world, run, method, **d):
    dd = {"method": method, "student": "cnn_tiny", "epochs": 2, "batch_size": 32, "workers": 0, "device": "cpu",
          "eval_dir": str(world["eval_dir"]), "val_fraction": 0.1, "augment": "flip", "lr": 0.05}
    dd.update(d)
    return load_config(None, {"name": run.name, "runs_root": str(run.parent), "teacher": str(world["teacher"]),
                              "distill": dd})


@pytest.fixture()
def run(digits_world, tmp_path):
    r = tmp_path / "runs" / "web"
    shutil.copytree(digits_world["run"], r)
    return r


@pytest.mark.parametrize("method", ["kd3", "kd", "dfnd"])
def test_method_end_to_end(digits_world, run, method):
    # kd3 runs 4 epochs: with the release's schedule E_cut = E/2, so at 2 epochs the teacher would weigh in
    # no epoch's selection (alpha_e = 0 from the first 1-based epoch on)
    epochs = 4 if method == "kd3" else 2
    cfg = _cfg(digits_world, run, method, epochs=epochs,
               **({"kd3": {"selection_rule": "confidence"}} if method == "kd3" else {}))  # the release's rule
    m = distill(cfg, out_id="t")
    out = run / "distill" / f"{method}-t"
    for f in ("student.pt", "student.torchscript.pt", "checkpoint.pt", "metrics.json", "selection.jsonl", "train.log"):
        assert (out / f).is_file(), f
    assert read_json(out / "metrics.json") == json.loads(json.dumps(m))
    f = m["final"]
    assert f["done"] and f["epochs"] == epochs and f["eval"] == "eval_dir"
    assert 0.0 <= f["top1"] <= 1.0 and 0.0 <= f["agreement"] <= 1.0
    assert f["teacher_top1"] > 0.8  # the digits teacher is good on its own test set
    assert f["params"] > 0 and f["throughput_img_s"] > 0
    # the deployed model's size beside its top-1: what is exported (for kd3 backbone + projector + classifier)
    from distill.models import count_params, deployed_cost
    from distill.teacher import load_teacher

    exported, meta = load_teacher(out / "student.pt")  # student.pt is in the teacher checkpoint contract
    assert f["params"] == count_params(exported)
    assert f["flops_per_image"] == deployed_cost(exported, meta["input_size"])["flops_per_image"] > 0
    assert f["cpu_latency_ms_b1"] > 0 and f["cpu_latency_ms_b64"] > 0
    conf = np.array(f["confusion"])  # the student on eval_dir, [true][predicted], for the report
    k = len(read_json(run / "manifest.json")["classes"])
    assert conf.shape == (k, k) and conf.sum() > 0 and np.trace(conf) / conf.sum() == pytest.approx(f["top1"])
    rows = read_jsonl(out / "selection.jsonl")
    assert [r["epoch"] for r in rows] == list(range(epochs))
    for e in m["epochs"]:
        assert set(e) >= {"epoch", "losses", "lr", "selected", "selected_per_class", "eval_top1", "val_agreement",
                          "time_s"}
        assert all(v == v and abs(v) < 1e6 for v in e["losses"].values())  # finite
        assert sum(e["selected_per_class"].values()) == e["selected"]
    if method == "kd":
        assert rows[0]["selected_keys"] == "all" and f["selected_fraction"] == 1.0
        assert set(m["epochs"][0]["losses"]) == {"kd", "total"}
    if method == "dfnd":
        chosen = [SelectionRow.from_row(r).keys([], out) for r in rows]  # keys or a mask, the shorter
        assert chosen[0] == chosen[1]  # one-off selection
        assert len(chosen[0]) == m["epochs"][0]["selected"] == round(0.5 * len(
            (out / "pool_keys.txt").read_text().split()))
        assert set(m["epochs"][0]["losses"]) == {"kd", "nll", "total"}
    if method == "kd3":
        assert set(m["epochs"][0]["losses"]) == {"feat", "con", "total"}
        # the release's 1-based epoch 1: 1 - exp(-5 ((1 + 1)/E_ramp - 1)^2), E_ramp = 4 * 2/3; epoch 2 >= E_cut = 2
        assert rows[0]["alpha"] == pytest.approx(1 - 2.718281828 ** (-5 * (2 / (4 * 2 / 3) - 1) ** 2), rel=1e-4)
        assert rows[1]["alpha"] == 0.0 and set(rows[0]["thresholds"]) == set(read_json(run / "manifest.json")["classes"])
        keys = set((out / "pool_keys.txt").read_text().split())
        chosen = SelectionRow.from_row(rows[0]).keys([], out)
        assert chosen <= keys and len(chosen) == m["epochs"][0]["selected"]
    # the deployable student: contract file and TorchScript give the same predictions
    student, meta = load_teacher(out / "student.pt", classes=read_json(run / "manifest.json")["classes"])
    ts, ts_meta = load_teacher(out / "student.torchscript.pt")
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(student(x), ts(x), atol=1e-4)
    assert meta["arch"] == ("kd3_student" if method == "kd3" else "cnn_tiny") and ts_meta["mean"] == meta["mean"]
    # a finished run is not redone
    again = distill(cfg, out_id="t")
    assert again["final"] == f


def test_kd3_options_and_ablations_run(digits_world, run):
    cfg = _cfg(digits_world, run, "kd3", epochs=1, val_fraction=0.0, eval_dir=None,
               kd3={"selection": False, "cross_contrastive": True, "mix_level": "feature",
                    "classifier_align_loss": True, "weighting": False})
    m = distill(cfg, out_id="opts")
    assert set(m["epochs"][0]["losses"]) == {"feat", "con", "cls_align", "total"}
    assert m["final"]["eval"] == "web-holdout" and m["final"]["top1"] is None  # no holdout, no eval set
    cfg = _cfg(digits_world, run, "kd3", epochs=1, kd3={"selection": False, "sharing": False, "mixdist": False})
    m = distill(cfg, out_id="abl")
    assert m["epochs"][0]["selected"] == len((run / "distill" / "kd3-abl" / "pool_keys.txt").read_text().split())
    assert set(m["epochs"][0]["losses"]) == {"kd", "feat", "total"}
    assert m["final"]["selected_fraction"] == 1.0


def test_resume_after_interruption_continues_exactly(digits_world, run):
    cfg = _cfg(digits_world, run, "kd3", epochs=3)
    full = distill(cfg, out_id="full")

    with pytest.raises(Crash):
        distill(cfg, out_id="cut", on_epoch_end=crash_after_first)
    out = run / "distill" / "kd3-cut"
    assert not (out / "student.pt").exists() and (out / "checkpoint.pt").exists()
    with pytest.raises(DataError, match="unfinished run: pass --resume"):
        distill(cfg, out_id="cut")
    resumed = distill(cfg, out_id="cut", resume=True)
    assert resumed["final"]["epochs"] == 3 == len(resumed["epochs"])
    assert [r["epoch"] for r in read_jsonl(out / "selection.jsonl")] == [0, 1, 2]
    # same RNG, same data order: identical selections, losses and weights
    assert [e["selected"] for e in resumed["epochs"]] == [e["selected"] for e in full["epochs"]]
    assert resumed["epochs"][-1]["losses"] == pytest.approx(full["epochs"][-1]["losses"], rel=1e-5)
    a = torch.load(run / "distill" / "kd3-full" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_cli_distill_and_teacher_info(digits_world, run, capsys):
    from pipeline.app.cli import main

    rc = main(["distill", "--manifest", str(run / "manifest.json"), "--teacher", str(digits_world["teacher"]),
               "--student", "cnn_tiny", "--method", "kd", "--epochs", "1", "--distill.workers", "0",
               "--distill.device", "cpu", "--distill.batch_size", "64", "--out-id", "cli"])
    assert rc == 0
    assert (run / "distill" / "kd-cli" / "student.pt").is_file()
    assert "kd3 distill: kd cnn_tiny → top-1 " in capsys.readouterr().out
    assert main(["teacher", "info", str(digits_world["teacher"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == ["digit0", "digit1", "digit2", "digit3"] and info["input_size"] == 16
    assert 250_000 < info["params"] < 400_000
    # user errors: one line, exit 2
    assert main(["distill", "--manifest", str(run / "manifest.json"), "--teacher", str(run / "nope.pt"),
                 "--distill.device", "cpu"]) == 2
    assert "teacher checkpoint" in capsys.readouterr().err
    assert main(["distill", "--manifest", str(run / "manifest.json"), "--teacher", str(digits_world["teacher"]),
                 "--method", "bogus", "--distill.device", "cpu", "--distill.workers", "0"]) == 2
    assert "unknown distillation method 'bogus'" in capsys.readouterr().err


def test_torchrun_two_processes_cpu(digits_world, run, tmp_path):
    """DDP on CPU (gloo): the selection pass is sharded and all-gathered, training split across ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from pipeline.core.config import load_config\n"
        "from distill.stage import distill\n"
        f"cfg = load_config(None, {{'name': 'web', 'runs_root': {str(run.parent)!r}, "
        f"'teacher': {str(digits_world['teacher'])!r}, 'distill': {{'method': 'dfnd', 'student': 'cnn_tiny', "
        "'epochs': 1, 'batch_size': 32, 'workers': 0, 'device': 'cpu', 'val_fraction': 0.1}})\n"
        "distill(cfg, out_id='ddp')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = read_json(run / "distill" / "dfnd-ddp" / "metrics.json")
    assert m["world_size"] == 2 and m["final"]["done"]
    n_pool = len((run / "distill" / "dfnd-ddp" / "pool_keys.txt").read_text().split())
    assert m["epochs"][0]["selected"] == round(0.5 * n_pool)  # the gathered selection covers the whole pool
    assert (run / "distill" / "dfnd-ddp" / "student.pt").is_file()


def test_summary_line_and_progress_without_a_terminal(digits_world, run, capsys, caplog):
    """`kd3 distill` ends with one formatted line; without a TTY the batches are reported every
    distill.log_every, and every epoch line carries the run's ETA (issue 13, item 12)."""
    import logging

    from distill.stage import summary_line
    from pipeline.app.cli import main

    metrics = {"method": "kd3", "student": "cnn_mini", "final": {
        "top1": 0.87, "eval": "eval_dir", "teacher_top1": 0.9685, "agreement": 0.881, "params": 192_345,
        "throughput_img_s": 511.6}}
    assert summary_line(metrics) == ("kd3 distill: kd3 cnn_mini → top-1 87.0% (eval_dir), teacher 96.9%, "
                                     "agreement 88.1%, 192k params, 512 img/s")
    with caplog.at_level(logging.INFO, logger="kd3"):
        rc = main(["distill", "--manifest", str(run / "manifest.json"), "--teacher", str(digits_world["teacher"]),
                   "--student", "cnn_tiny", "--method", "kd", "--epochs", "2", "--distill.workers", "0",
                   "--distill.device", "cpu", "--distill.batch_size", "16", "--distill.log_every", "3",
                   "--eval-dir", str(digits_world["eval_dir"]), "--out-id", "progress"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("kd3 distill: kd cnn_tiny → top-1 ") and "(eval_dir), teacher " in out[-1]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("train e0: 3/") and "batches" in m and "ETA" in m for m in msgs), msgs
    assert [m for m in msgs if m.startswith("epoch 1/2:")][0].rstrip().split("ETA ")[-1].endswith("s")


def test_cosine_lr_schedule(digits_world, run):
    import math

    cfg = _cfg(digits_world, run, "kd", epochs=4, lr_schedule="cosine")
    m = distill(cfg, out_id="cos")
    lrs = [e["lr"] for e in m["epochs"]]
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    step = distill(_cfg(digits_world, run, "kd", epochs=4), out_id="step")
    assert [e["lr"] for e in step["epochs"]] == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # milestones 2, 3, 4


def test_teacher_train_augment_decides_about_flips(tmp_path, capsys):
    """`kd3 teacher train --augment`: with flips (the default) a teacher cannot tell "bright on the left" from
    "bright on the right"; with `crop` (no flip) it learns them (issue 13, item 12)."""
    import numpy as np
    from PIL import Image

    from pipeline.app.cli import main

    rng = np.random.default_rng(0)
    for cls, side in (("left", 0), ("right", 1)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(24):
            a = rng.integers(0, 40, (16, 16, 3)).astype(np.uint8)
            a[:, side * 8:(side + 1) * 8] += 200
            Image.fromarray(a).save(tmp_path / "data" / cls / f"{i}.png")
    acc = {}
    for aug in ("flip", "crop"):
        assert main(["teacher", "train", "--data", str(tmp_path / "data"), "--arch", "cnn_tiny", "--out",
                     str(tmp_path / f"{aug}.pt"), "--epochs", "12", "--img-size", "16", "--batch-size", "8",
                     "--device", "cpu", "--augment", aug, "--val-dir", str(tmp_path / "data")]) == 0
        line = capsys.readouterr().out
        acc[aug] = float(line.split("train acc ")[1].split(",")[0])
    assert acc["crop"] > 0.9 and acc["flip"] < 0.75, acc


def test_kd3_equal_steps_trains_a_pool_pass_per_epoch(digits_world, run):
    """kd3.equal_steps cycles the selection to the pool's size: selecting costs no SGD steps."""
    cfg = _cfg(digits_world, run, "kd3", epochs=4, val_fraction=0.0, eval_dir=None,
               kd3={"selection_rule": "confidence", "equal_steps": True, "tau": 0.5})
    m = distill(cfg, out_id="eq")
    pool = len((run / "distill" / "kd3-eq" / "pool_keys.txt").read_text().split())
    rows = [e for e in m["epochs"] if 2 <= e["selected"] < pool]
    assert rows, "no epoch selected a strict subset"
    for e in rows:
        assert pool - 1 <= e["trained"] <= pool  # a last batch of one image is dropped (train-mode BN)
    cfg = _cfg(digits_world, run, "kd3", epochs=4, val_fraction=0.0, eval_dir=None,
               kd3={"selection_rule": "confidence", "equal_steps": False, "tau": 0.5})
    m = distill(cfg, out_id="sel")
    for e in m["epochs"]:
        assert e["trained"] <= e["selected"]


def test_kd3_default_selects_by_bn_statistics_once(digits_world, run):
    """kd3's default rule: one teacher pass scores the pool (eval transform); the selection is the low
    component of the score mixture, the same every epoch, and every epoch trains a pool pass."""
    cfg = _cfg(digits_world, run, "kd3", epochs=3, val_fraction=0.0, eval_dir=None)
    assert cfg.distill.kd3.selection_rule == "bn" and cfg.distill.kd3.equal_steps
    m = distill(cfg, out_id="bn")
    out = run / "distill" / "kd3-bn"
    rows = read_jsonl(out / "selection.jsonl")
    pool = len((out / "pool_keys.txt").read_text().split())
    assert all(r["id"]["rule"] == "gmm" and r["alpha"] is None and r.get("thresholds") is None for r in rows)
    chosen = [SelectionRow.from_row(r).keys([], out) for r in rows]
    assert chosen[0] == chosen[1] == chosen[2]
    assert 0 < len(chosen[0]) < pool
    assert all(pool - 1 <= e["trained"] <= pool for e in m["epochs"])
    assert all(e["time_select_s"] < m["epochs"][0]["time_select_s"] for e in m["epochs"][1:])  # no pass after epoch 0


def test_kd3_compact_export_is_the_plain_student_and_trains_the_backbone_as_full(digits_world, run):
    """`distill.kd3.export: compact` writes the student architecture at its own size, its own classifier
    fitted to the full head's logits on detached features: the backbone and the projector learn exactly what
    they learn under `full` (same KD³ losses, same weights), only the exported head differs."""
    from distill.models import count_params, create_model
    from distill.teacher import load_teacher

    full = distill(_cfg(digits_world, run, "kd3", epochs=2), out_id="full")
    comp = distill(_cfg(digits_world, run, "kd3", epochs=2, kd3={"export": "compact"}), out_id="compact")
    for a, b in zip(full["epochs"], comp["epochs"]):
        assert set(b["losses"]) == set(a["losses"]) | {"compact"}
        for k in ("feat", "con"):
            assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-6, abs=1e-9), k
        assert b["selected"] == a["selected"]
    plain = count_params(create_model("cnn_tiny", 4))
    assert comp["final"]["params"] == plain < full["final"]["params"]
    model, meta = load_teacher(run / "distill" / "kd3-compact" / "student.pt")
    assert meta["arch"] == "cnn_tiny" and count_params(model) == plain
    assert comp["epochs"][1]["losses"]["compact"] < comp["epochs"][0]["losses"]["compact"]  # the head learns
    assert comp["final"]["top1"] is not None  # measured on the exported (compact) model
    full_model, _ = load_teacher(run / "distill" / "kd3-full" / "student.pt")
    backbone = full_model.backbone.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(v, backbone[k], msg=k)  # the same backbone, trained the same way


def test_layernorm_teacher_warns_of_its_fallback_and_selects_by_anchors(digits_world, run, tmp_path, caplog):
    """A LayerNorm teacher has no BN statistics: the default rule says, in a warning, which rule it falls back
    to; with a few original images per class (distill.anchor_dir) `selection_rule: anchors` selects by the
    teacher's statistics on them, and a folder that is the eval set is refused."""
    import logging

    from pipeline.app.cli import main
    from pipeline.core.errors import ConfigError

    teacher = tmp_path / "ln_teacher.pt"
    assert main(["teacher", "train", "--data", str(digits_world["base"] / "train"), "--arch", "cnn_small_ln",
                 "--out", str(teacher), "--epochs", "4", "--img-size", "16", "--batch-size", "32", "--lr", "0.05",
                 "--device", "cpu"]) == 0
    anchors = tmp_path / "anchors"
    for d in sorted((digits_world["base"] / "train").iterdir()):
        (anchors / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:5]:
            shutil.copy(f, anchors / d.name / f.name)

    def cfg(with_anchors=True, **kd3):
        c = _cfg(digits_world, run, "kd3", epochs=1, kd3=kd3, anchor_dir=str(anchors) if with_anchors else None)
        return c.model_copy(update={"teacher": teacher})

    def first_row(out_id):
        return json.loads((run / "distill" / f"kd3-{out_id}" / "selection.jsonl").read_text().splitlines()[0])

    with caplog.at_level(logging.WARNING, logger="kd3"):
        m = distill(cfg(with_anchors=False), out_id="ln-default")
    assert "falls back to the release's confidence rule" in caplog.text and "distill.anchor_dir" in caplog.text
    first = first_row("ln-default")
    assert m["final"]["done"] and first["alpha"] is not None and "id" not in first  # the release's rule ran
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd3"):
        m = distill(cfg(), out_id="ln-default-anchors")  # the default rule, anchor images given: the anchors rule
    assert "falls back to selection_rule anchors" in caplog.text
    assert m["final"]["done"] and first_row("ln-default-anchors")["id"]["rule"] == "gmm"
    m = distill(cfg(selection_rule="anchors"), out_id="ln-anchors")
    sel = [json.loads(ln) for ln in (run / "distill" / "kd3-ln-anchors" / "selection.jsonl").read_text().splitlines()]
    n_pool = len((run / "distill" / "kd3-ln-anchors" / "pool_keys.txt").read_text().split())
    assert sel[0]["id"]["rule"] == "gmm" and 0 < m["epochs"][0]["selected"] < n_pool
    assert m["final"]["done"]
    with pytest.raises(ConfigError, match="anchor_dir is distill.eval_dir"):
        distill(_cfg(digits_world, run, "kd3", epochs=1, anchor_dir=str(digits_world["eval_dir"]),
                     kd3={"selection_rule": "anchors"}), out_id="same")
