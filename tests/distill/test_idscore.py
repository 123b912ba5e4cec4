"""The in-distribution score from the teacher's BatchNorm statistics, on hand-made nets and tensors."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from distill.methods import create_method
from distill.methods.idscore import BNStatScorer, bn_scores, gmm_low_component, in_distribution_mask
from distill.models import Backbone, create_model
from distill.methods.settings import Kd3Settings as Kd3Config

torch.set_num_threads(1)


class OneBN(Backbone):
    """x -> BN(2 channels, hand-set running stats) -> ReLU; classifier on the pooled map."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        self.bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        self.feature_dim = 2
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
            self.classifier.bias.zero_()
        self.eval()

    def forward_features(self, x):
        return torch.relu(self.bn(x[:, :2]))


def _image(mean, std, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, hw * hw, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    x = x * torch.tensor(std).view(2, 1) + torch.tensor(mean).view(2, 1)
    return torch.cat([x.view(2, hw, hw), torch.zeros(1, hw, hw)]).unsqueeze(0)


def test_bn_score_is_zero_at_the_running_stats_and_the_hand_value_elsewhere():
    t = OneBN()
    sc = BNStatScorer(t)
    at = _image([1.0, -2.0], [2.0, 0.5])           # per-channel mean/std = the running stats
    off = _image([3.0, -2.0], [2.0, 1.0], seed=1)  # channel 0 mean +2 (1 running sd), channel 1 var x4
    with sc, torch.no_grad():
        t(torch.cat([at, off]))
    s = sc.take()
    eps = 1e-5
    want_off = 0.5 * ((2.0 ** 2) / (4.0 + eps) + math.log((1.0 + eps) / (0.25 + eps)) ** 2
                      + math.log((4.0 + eps) / (4.0 + eps)) ** 2)
    assert s[0].item() == pytest.approx(0.0, abs=1e-4)
    assert s[1].item() == pytest.approx(want_off, rel=1e-4)
    with torch.no_grad():          # hooks are gone after the block: nothing accumulates
        t(at)
    assert sc._acc is None


def test_bn_scores_run_over_the_pool_without_augmentation():
    t = OneBN()
    images = torch.cat([_image([1.0, -2.0], [2.0, 0.5], seed=i) for i in range(3)] + [_image([9.0, 5.0], [1.0, 1.0])])
    seen = {}

    def infer(fn, augment=True):
        seen["augment"] = augment
        with torch.no_grad():
            return torch.cat([fn(images[i:i + 2]) for i in range(0, 4, 2)])

    s, z = bn_scores(t, infer)
    assert seen["augment"] is False and s.shape == (4,) and z.shape == (4, 2)
    with torch.no_grad():
        assert torch.allclose(z, t(images))
    assert s[:3].max() < 1e-3 < s[3]


def test_a_net_without_batchnorm_is_refused():
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no BatchNorm2d"):
        BNStatScorer(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_gmm_finds_the_low_cluster_and_quantile_keeps_a_share_per_class():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(-1.0, 0.3, 200), rng.normal(1.5, 0.5, 600)])
    post, fit = gmm_low_component(v)
    assert fit["mu"][fit["low"]] == pytest.approx(-1.0, abs=0.1)
    assert (post[:200] >= 0.5).mean() > 0.97 and (post[200:] >= 0.5).mean() < 0.03
    mask, info = in_distribution_mask(torch.from_numpy(np.exp(v)), "gmm", 0.5)
    assert info["kept"] == int(mask.sum()) and 190 <= info["kept"] <= 215
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    pred = torch.tensor([0, 0, 0, 0, 1, 1])
    mask, _ = in_distribution_mask(scores, "quantile", 0.5, pred, 3)
    assert mask.tolist() == [True, True, False, False, True, False]   # the lower half of each class


def test_kd3_selection_drops_confident_out_of_distribution_images():
    """The teacher is certain on every image; the release's rule keeps them all, the bn score drops the
    ones whose BN statistics are far from the running stats."""
    teacher = OneBN()
    student = OneBN().train()
    cfg = Kd3Config(mixdist=False, selection_rule="confidence")
    ind = [_image([1.0, -2.0], [2.0, 0.5], seed=i) for i in range(12)]
    ood = [_image([14.0, -2.0], [0.3, 3.0], seed=100 + i) for i in range(6)]  # channel 0 high: class 0, certain
    images = torch.cat(ind + ood)

    def infer(fn, augment=True):
        with torch.no_grad():
            return fn(images)

    m = create_method("kd3", student, teacher, cfg, 2, student_arch="x").eval()
    sel = m.select(0, 10, infer)
    assert set(range(12, 18)) <= set(sel.indices.tolist())          # the release's rule keeps the confident junk
    for rule in ("bn", "bn+confidence"):
        cfg.selection_rule = rule
        m = create_method("kd3", student, teacher, cfg, 2, student_arch="x").eval()
        sel = m.select(0, 10, infer)
        assert not set(sel.indices.tolist()) & set(range(12, 18))
        assert sel.log["id"]["kept"] == 12
    assert set(sel.indices.tolist()) <= set(range(12))


def test_bn_rule_falls_back_to_anchors_when_given_else_to_the_release_rule_without_batchnorm(caplog):
    class NoBN(Backbone):  # a LayerNorm-style net: no BatchNorm running statistics to compare with
        def __init__(self):
            super().__init__()
            self.feature_dim = 2
            self.classifier = nn.Linear(2, 2)

        def forward_features(self, x):
            return torch.relu(x[:, :2])

    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def infer(fn, augment=True):
        with torch.no_grad():
            return fn(images)

    def first_selection(teacher, student, anchors):
        m = create_method("kd3", student, teacher, Kd3Config(mixdist=False), 2, student_arch="x").eval()
        m.anchor_batches = (lambda: iter([images[:6]])) if anchors else None  # what distill.anchor_dir gives
        caplog.clear()
        return m, m.select(0, 10, infer)

    # no normalisation layer at all: nothing to compare anchors with, the release's rule
    m, sel = first_selection(NoBN().eval(), OneBN().train(), anchors=True)
    assert m.rule == "confidence" and "falls back to the release's confidence rule" in caplog.text
    assert sel.log["alpha"] is not None and "id" not in sel.log
    # a LayerNorm teacher: the anchors rule when anchor images are given (the measured better fallback) ...
    ln = create_model("cnn_tiny_ln", 2).eval()
    m, sel = first_selection(ln, create_model("cnn_tiny", 2).train(), anchors=True)
    assert m.rule == "anchors" and "falls back to selection_rule anchors" in caplog.text
    assert sel.log["id"]["rule"] == "gmm" and sel.log["alpha"] is None
    # ... else the release's rule, and the warning says what anchors would give
    m, sel = first_selection(ln, create_model("cnn_tiny", 2).train(), anchors=False)
    assert m.rule == "confidence" and "distill.anchor_dir" in caplog.text and sel.log["alpha"] is not None


def test_anchor_reference_is_what_a_bn_layer_would_have_learnt_and_scores_like_the_bn_rule():
    """The anchors rule's reference is the mean and variance of each normalisation layer's input over the
    anchor images: on anchors drawn from the BN layer's own statistics it equals the running statistics, so
    both rules score a pool alike; a LayerNorm over channels-last tokens is read on its last dim."""
    from distill.methods.idscore import anchor_reference

    net = OneBN()
    anchors = torch.cat([_image([1.0, -2.0], [2.0, 0.5], seed=s) for s in range(64)])
    (m, v), = anchor_reference(net, [anchors[:32], anchors[32:]])
    assert torch.allclose(m, torch.tensor([1.0, -2.0]), atol=1e-5) and torch.allclose(v, torch.tensor([4.0, 0.25]),
                                                                                       atol=1e-4)
    pool = torch.cat([_image([1.0, -2.0], [2.0, 0.5], seed=100), _image([3.0, 0.0], [1.0, 1.0], seed=101)])

    def infer(fn, augment=False):
        return fn(pool)

    bn, _ = bn_scores(net, infer)
    anc, _ = bn_scores(net, infer, anchor_reference(net, [anchors]))
    assert torch.allclose(bn, anc, rtol=1e-3, atol=1e-5) and anc[0] < anc[1]
    ln = nn.LayerNorm(3)  # tokens (B, N, C): statistics per channel over the tokens
    toks = torch.randn(4, 10, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([0.0, 5.0, -5.0])
    (m, v), = anchor_reference(nn.Sequential(ln), [toks])
    assert torch.allclose(m, toks.reshape(-1, 3).mean(0), atol=1e-5)
    assert torch.allclose(v, toks.reshape(-1, 3).var(0, unbiased=False), atol=1e-4)


def test_anchors_rule_needs_a_folder_and_a_normalisation_layer():
    from pipeline.core.config import load_config
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="selection_rule anchors needs distill.anchor_dir"):
        load_config(None, {"name": "x", "classes": ["a", "b"], "distill": {"kd3": {"selection_rule": "anchors"}}})

    class NoNorm(Backbone):
        def __init__(self):
            super().__init__()
            self.conv, self.feature_dim, self.classifier = nn.Conv2d(3, 4, 3), 4, nn.Linear(4, 2)

        def forward_features(self, x):
            return self.conv(x)

    cfg = Kd3Config(selection_rule="anchors")
    with pytest.raises(ConfigError, match="no normalisation layer"):
        create_method("kd3", NoNorm(), NoNorm().eval(), cfg, 2, student_arch="s")
