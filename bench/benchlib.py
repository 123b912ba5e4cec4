"""Shared bench helpers: what machine the numbers came from, and interleaved A/B timing.

On a shared, noisy machine absolute times drift by 2-3x within minutes; a ratio of two measurements
taken back to back (A, B, A, B, ...) drifts much less. ``interleave`` runs the pair that way and
reports the median ratio and its spread (min..max over repeats) beside the per-side medians.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from typing import Callable


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Cores, torch/faiss threads, CPU model and load average, for printing beside every table."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count()
    info = {"cpu": cpu_model(), "cores": cpus, "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    try:
        import faiss

        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def format_machine(info: dict | None = None) -> str:
    info = info or machine()
    return ", ".join(f"{k} {v}" for k, v in info.items())


def interleave(a: Callable[[], object], b: Callable[[], object], repeats: int = 3) -> dict:
    """Run a, b, a, b, ... ``repeats`` times each. Each callable returns its own measure (seconds, or
    seconds per item), or a pair (wall seconds, CPU seconds of the process): the result is per-repeat
    ratios b/a, their median and spread, the medians of each side and the load average at each step;
    with pairs also the same for CPU time (``cpu_*``), which other jobs on the machine disturb far less
    than wall time (they take cores away, not work)."""
    ta, tb, ca, cb, loads = [], [], [], [], []
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        for fn, t, c in ((a, ta, ca), (b, tb, cb)):
            v = fn()
            t.append(float(v[0] if isinstance(v, tuple) else v))
            if isinstance(v, tuple) and v[1] is not None:
                c.append(float(v[1]))
    out = _ratios(ta, tb, "")
    out.update(load_1min=loads, repeats=repeats)
    if len(ca) == len(cb) == repeats:
        out.update(_ratios(ca, cb, "cpu_"))
    return out


def _ratios(ta: list[float], tb: list[float], prefix: str) -> dict:
    ratios = [y / x for x, y in zip(ta, tb)]
    return {f"{prefix}a": ta, f"{prefix}b": tb, f"{prefix}ratios": ratios,
            f"{prefix}ratio_median": statistics.median(ratios), f"{prefix}ratio_min": min(ratios),
            f"{prefix}ratio_max": max(ratios), f"{prefix}a_median": statistics.median(ta),
            f"{prefix}b_median": statistics.median(tb)}


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of the whole process, fn's result)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def quiet_logging() -> None:
    """Warnings only on the console (the distill trainer raises kd3's logger to INFO for its train.log)."""
    logging.basicConfig(level=logging.WARNING)
    for h in logging.getLogger().handlers:
        h.setLevel(logging.WARNING)


def photo_jpegs(n: int, px: tuple[int, int], seed: int = 0, square: bool = False, quality: int = 90) -> list[bytes]:
    """n distinct JPEGs: random crops (30-90 % of each side) of the real photos that ship with
    scikit-learn and scikit-image, resized so that the longer side is drawn from ``px`` (``square``:
    ``px[0]`` x ``px[0]``)."""
    import io

    import numpy as np
    import skimage.data as d
    from PIL import Image
    from sklearn.datasets import load_sample_images

    srcs = [Image.fromarray(a) for a in load_sample_images().images]
    srcs += [Image.fromarray(getattr(d, k)()).convert("RGB")
             for k in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = srcs[i % len(srcs)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        crop = im.crop((x, y, x + cw, y + ch))
        if square:
            size = (px[0], px[0])
        else:
            side = int(rng.integers(px[0], px[1] + 1))
            size = (side, max(32, side * ch // cw)) if cw >= ch else (max(32, side * cw // ch), side)
        buf = io.BytesIO()
        crop.resize(size).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
