"""The CPU speed-ups of issue 14 change no result: the teacher embedder's batched preprocess (PIL steps per
image, ToTensor + Normalize once per batch) gives the per-image tensors bit for bit, and distill with
channels_last on the CPU is deterministic and resumes exactly."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from distill.stage import distill
from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from testlib import Crash, crash_after_first

torch.set_num_threads(1)


def test_teacher_embedder_collate_equals_stacked_preprocess(digits_world):
    from distill.embedder import TeacherEmbedder

    emb = TeacherEmbedder(digits_world["teacher"], "cpu", ["0", "1", "2", "3"])
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((16, 16), (40, 23), (300, 200), (7, 90))]
    prepared = [emb.prepare(im) for im in imgs]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in prepared)  # no torch op per image
    batch = emb.collate(prepared)
    want = torch.stack([emb.preprocess(im) for im in imgs])
    assert batch.dtype == want.dtype and torch.equal(batch, want)
    assert np.array_equal(emb.embed(batch)[0], emb.embed(want)[0])


def _cfg(world, run, **d):
    dd = {"method": "kd3", "student": "cnn_tiny", "epochs": 2, "batch_size": 32, "workers": 0, "device": "cpu",
          "eval_dir": str(world["eval_dir"]), "val_fraction": 0.1, "augment": "flip", "lr": 0.05,
          "channels_last": True}
    dd.update(d)
    return load_config(None, {"name": run.name, "runs_root": str(run.parent), "teacher": str(world["teacher"]),
                              "distill": dd})


def _weights(path):
    return torch.load(path / "student.pt", weights_only=True)["state_dict"]


def test_channels_last_on_cpu_is_deterministic_and_resumes_exactly(digits_world, tmp_path):
    run = tmp_path / "runs" / "web"
    shutil.copytree(digits_world["run"], run)
    cfg = _cfg(digits_world, run)
    from distill.runtime import Runtime

    assert Runtime("cpu", "off", True).channels_last  # the setting reaches the CPU
    a = distill(cfg, out_id="a")
    b = distill(cfg, out_id="b")
    assert [e["losses"] for e in a["epochs"]] == [e["losses"] for e in b["epochs"]]  # bit for bit
    wa, wb = _weights(run / "distill" / "kd3-a"), _weights(run / "distill" / "kd3-b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    with pytest.raises(Crash):
        distill(cfg, out_id="cut", on_epoch_end=crash_after_first)
    with pytest.raises(DataError, match="unfinished run: pass --resume"):
        distill(cfg, out_id="cut")
    c = distill(cfg, out_id="cut", resume=True)
    assert [e["losses"] for e in c["epochs"]] == [e["losses"] for e in a["epochs"]]
    wc = _weights(run / "distill" / "kd3-cut")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # the memory format changes the kernels, not the maths: the first epoch's losses agree closely
    d = distill(_cfg(digits_world, run, channels_last=False, epochs=1), out_id="contig")
    for k, v in a["epochs"][0]["losses"].items():
        assert d["epochs"][0]["losses"][k] == pytest.approx(v, rel=1e-3), k
