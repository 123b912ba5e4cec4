"""Flows tests: one Prefect test harness for the session (temp PREFECT_HOME, local result storage in
tmp, sqlite), a tiny local-folder image source (sklearn digits upsampled) and a tiny teacher."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

CLASSES = ["zero", "one", "two"]
PER_CLASS_FILES = 12


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """Prefect against a temporary database; PREFECT_HOME and default result storage in tmp."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home),
                                     PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """<root>/<class>/*.png: real handwritten digits (sklearn), upsampled to 40x40 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        idx = np.flatnonzero(d.target == label)[:PER_CLASS_FILES]
        for j, i in enumerate(idx):
            img = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(img).resize((40, 40), Image.BICUBIC).convert("RGB")
            im.save(root / name / f"{name}_{j:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A randomly initialised cnn_tiny teacher in the kd3 checkpoint contract."""
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = create_model("cnn_tiny", len(CLASSES))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, "cnn_tiny", CLASSES, 32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], net.state_dict())
    return path


@pytest.fixture(scope="session")
def make_cfg(digits_folder, tiny_teacher, tmp_path_factory):
    from pipeline.core.config import load_config

    runs_root = tmp_path_factory.mktemp("runs")

    def make(name: str, **overrides):
        ov = {
            "name": name, "runs_root": str(runs_root), "classes": CLASSES, "teacher": str(tiny_teacher),
            "crawl.sources": ["folder"], "crawl.folder": str(digits_folder), "crawl.per_class": 10,
            "curate.embed_backend": "teacher", "curate.device": "cpu", "curate.workers": 0,
            "curate.batch_size": 32, "curate.phash_threshold": 0, "curate.near_dup_threshold": 1.0,
            "distill.method": "kd3", "distill.student": "cnn_tiny", "distill.epochs": 1,
            "distill.batch_size": 8, "distill.workers": 0, "distill.device": "cpu",
            "distill.val_fraction": 0.0, "flow.crawl_concurrency": 2, "flow.crawl_retries": 0,
            "flow.gpus": 1,
        }
        ov.update(overrides)
        return load_config(None, ov)

    return make
