"""Pools as crawl sources: the distill tests' tiny digits teacher (cnn_small, 16 px, classes digit0..3) assigns
the classes; the pools are made from scikit-learn's digits."""
from __future__ import annotations

import numpy as np
import pytest
from testlib import TESTS, load_module

_distill = load_module(TESTS / "distill" / "conftest.py", "kd3_distill_conftest")
digits_world = _distill.digits_world


@pytest.fixture(scope="session")
def digit_pixels():
    """(N x 16 x 16 x 3 uint8 images, labels): 80 digits 0..3 the teacher did not train on (its eval set)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.nonzero(d.target < 4)[0]
    rng = np.random.default_rng(0)
    rng.shuffle(keep)  # the fixture's order: its teacher trained on keep[:300]
    idx = keep[300:380]
    imgs = np.stack([np.asarray(_distill.digit_image(d.images[i])) for i in idx])
    return imgs.astype(np.uint8), d.target[idx]
