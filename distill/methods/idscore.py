"""In-distribution scores from the teacher alone: how far a web image sits from the original data.

The teacher's BatchNorm running mean/var are the only trace of its training data that it carries
(the observation behind DeepInversion's BN-statistics prior). A web image whose per-channel
activation statistics, at every BN layer, sit where the running statistics say the original data
sat is "in distribution"; noise, photos or another rendering style move them. The score needs no
labels and no original data, and it sees what the teacher's confidence cannot: the teacher is often
*confidently* wrong on off-distribution junk.

    score(x) = mean over BN layers l, channels c of
               (mu_lc(x) - m_lc)^2 / v_lc  +  log^2( s2_lc(x) / v_lc )

with mu_lc(x), s2_lc(x) the mean and variance over spatial positions of the BN layer's input for
image x, and m_lc, v_lc the layer's running mean and variance. Lower = closer to the original data.

A teacher without BatchNorm (LayerNorm: ViT, ConvNeXt) carries no such trace. Given a few original images
per class (``distill.anchor_dir``), the same score runs at every normalisation layer (BatchNorm, LayerNorm
of either layout, GroupNorm) with m_lc, v_lc measured on those anchors instead (``selection_rule:
anchors``, :func:`anchor_reference`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.errors import ConfigError

EPS = 1e-5


def _channel_stats(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: the mean and variance over positions of an activation (B, C, H, W), or of
    tokens (B, N, C) / a channels-last map (B, H, W, C) when ``channels_last``."""
    x = x.float()
    if x.dim() == 4 and not channels_last:  # a feature map: reduced exactly as the BN rule always has
        return x.mean(dim=(2, 3)), x.var(dim=(2, 3), unbiased=False)
    if channels_last:
        x = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    else:
        x = x.reshape(x.shape[0], x.shape[1], -1)
    return x.mean(dim=2), x.var(dim=2, unbiased=False)


def _is_channels_last(mod: nn.Module, x: torch.Tensor) -> bool:
    """A LayerNorm over the last dim normalises channels there; kd3's LayerNorm2d takes (B, C, H, W)."""
    shape = getattr(mod, "normalized_shape", None)
    return bool(shape) and x.dim() >= 3 and x.shape[-1] == shape[-1] and x.shape[1] != shape[-1]


class StatScorer:
    """Forward pre-hooks on ``layers`` of ``teacher`` accumulate, per image, how far the per-channel statistics
    of each layer's input sit from a reference ``(mean, var)`` per layer (the score of the module docstring).

    Use as a context manager around teacher forwards; ``take()`` returns and resets the scores of the
    images seen since the last call.
    """

    def __init__(self, layers: list[nn.Module], refs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers, self.refs = layers, refs
        self._handles: list = []
        self._acc: torch.Tensor | None = None

    def _hook(self, i: int):
        def hook(mod, inputs):
            mu, var = _channel_stats(inputs[0], _is_channels_last(mod, inputs[0]))
            rm, rv = self.refs[i]
            rm, rv = rm.to(mu.device).float(), rv.to(mu.device).float() + EPS
            d = (mu - rm) ** 2 / rv + torch.log((var + EPS) / rv) ** 2
            s = d.mean(dim=1)
            self._acc = s if self._acc is None else self._acc + s
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> torch.Tensor:
        out = self._acc / len(self.layers)
        self._acc = None
        return out


class BNStatScorer(StatScorer):
    """The reference is every BatchNorm2d layer's running mean and variance."""

    def __init__(self, teacher: nn.Module):
        layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats
                  and m.running_mean is not None]
        if not layers:
            raise ConfigError("selection_rule bn: the teacher has no BatchNorm2d layers with running statistics "
                              "(a TorchScript teacher hides them; use a checkpoint-contract teacher)")
        super().__init__(layers, [(m.running_mean, m.running_var) for m in layers])


NORM_LAYERS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def has_norm_layers(teacher: nn.Module) -> bool:
    return any(isinstance(m, NORM_LAYERS) for m in teacher.modules())


def norm_layers(teacher: nn.Module) -> list[nn.Module]:
    """The layers whose inputs the anchors rule compares: every normalisation layer (BatchNorm, LayerNorm of
    any layout, GroupNorm), where a network's activation statistics are meant to be stable."""
    layers = [m for m in teacher.modules() if isinstance(m, NORM_LAYERS)]
    if not layers:
        raise ConfigError("selection_rule anchors: the teacher has no normalisation layer (BatchNorm, LayerNorm, "
                          "GroupNorm) whose inputs could be compared")
    return layers


def anchor_reference(teacher: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per normalisation layer, the mean and variance of its input over the anchor images and positions (what
    a BN layer's running statistics would be, had it seen the anchors): the reference of the anchors rule."""
    layers = norm_layers(teacher)
    sums: list = [None] * len(layers)

    def hook(i):
        def h(mod, inputs):
            x = inputs[0].float()
            if _is_channels_last(mod, x):
                x = x.reshape(-1, x.shape[-1])
            else:
                x = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            part = torch.stack([x.sum(0), (x * x).sum(0), torch.full_like(x[0], len(x))])
            sums[i] = part if sums[i] is None else sums[i] + part
        return h

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            for x in batches:
                teacher(x)
    finally:
        for h in handles:
            h.remove()
    if sums[0] is None:
        raise ConfigError("selection_rule anchors: distill.anchor_dir gave no image")
    refs = []
    for s1, s2, n in (t.double() for t in sums):
        mean = s1 / n
        refs.append((mean.float(), (s2 / n - mean * mean).clamp_min(0).float()))
    return refs


def bn_scores(teacher: nn.Module, infer, refs: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The score and the teacher's logits of every pool image: one no-grad teacher pass through ``infer``
    (pool order, the eval transform). The reference: the BN running statistics, or ``refs`` (one
    ``(mean, var)`` per :func:`norm_layers` layer, from :func:`anchor_reference`)."""
    scorer = BNStatScorer(teacher) if refs is None else StatScorer(norm_layers(teacher), refs)

    def fn(x):
        with scorer:
            z = teacher(x).float()
        return torch.cat([scorer.take().unsqueeze(1), z], dim=1)

    out = infer(fn, augment=False)
    return out[:, 0], out[:, 1:]


def has_bn_statistics(teacher: nn.Module) -> bool:
    try:
        BNStatScorer(teacher)
    except ConfigError:
        return False
    return True


def gmm_low_component(values: np.ndarray, iters: int = 200) -> tuple[np.ndarray, dict]:
    """Two-component 1-D Gaussian mixture (EM) on ``values``; returns the posterior of the component
    with the lower mean for every value, and the fit. Deterministic (initialised at the quartiles)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 4 or float(v.std()) == 0.0:
        return np.ones(len(v)), {"mu": [float(v.mean())] * 2, "sd": [0.0, 0.0], "w": [1.0, 0.0]}
    mu = np.array([np.quantile(v, 0.25), np.quantile(v, 0.75)])
    sd = np.full(2, v.std() / 2 + 1e-6)
    w = np.array([0.5, 0.5])
    for _ in range(iters):
        logp = -0.5 * ((v[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        logp -= logp.max(axis=1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(axis=1, keepdims=True)
        n = r.sum(axis=0) + 1e-12
        new_mu = (r * v[:, None]).sum(axis=0) / n
        sd = np.sqrt((r * (v[:, None] - new_mu) ** 2).sum(axis=0) / n) + 1e-6
        w = n / n.sum()
        if np.allclose(new_mu, mu, atol=1e-9):
            mu = new_mu
            break
        mu = new_mu
    lo = int(np.argmin(mu))
    logp = -0.5 * ((v[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
    logp -= logp.max(axis=1, keepdims=True)
    r = np.exp(logp)
    r /= r.sum(axis=1, keepdims=True)
    return r[:, lo], {"mu": mu.tolist(), "sd": sd.tolist(), "w": w.tolist(), "low": lo}


def in_distribution_mask(scores: torch.Tensor, rule: str, keep: float, pred: torch.Tensor | None = None,
                         num_classes: int = 0) -> tuple[torch.Tensor, dict]:
    """Which images count as in-distribution.

    ``gmm``: a two-component mixture on log scores, calibrated on the pool itself; keep the images the
    low-score component explains (posterior >= 0.5). ``quantile``: keep the ``keep`` share with the lowest
    score within each predicted class (``pred``), so every class keeps some images.
    """
    s = scores.double().clamp_min(1e-12).log().numpy()
    if rule == "gmm":
        post, fit = gmm_low_component(s)
        mask = torch.from_numpy(post >= 0.5)
        thr = None
        if mask.any():
            thr = float(math.exp(s[mask.numpy()].max()))
        return mask, {"rule": "gmm", "fit": fit, "threshold": thr, "kept": int(mask.sum())}
    if rule == "quantile":
        if pred is None:
            raise ValueError("quantile rule needs predictions")
        mask = torch.zeros(len(s), dtype=torch.bool)
        for c in range(num_classes):
            idx = torch.nonzero(pred == c).flatten()
            if len(idx) == 0:
                continue
            k = max(1, int(round(keep * len(idx))))
            order = torch.argsort(torch.from_numpy(s)[idx], stable=True)[:k]
            mask[idx[order]] = True
        return mask, {"rule": "quantile", "keep": keep, "kept": int(mask.sum())}
    raise ConfigError(f"unknown id_rule {rule!r} (gmm, quantile)")
