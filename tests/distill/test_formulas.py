"""Each KD3_SPEC formula on hand-made tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill.methods.losses import (class_thresholds, disagreement_weights, kd_loss, match_spatial,
                                    mix_distribution, mixed_probs, noise_adaptation_matrix, noisy_nll,
                                    nt_xent_views, select_confident, weighted_feature_mse)

torch.set_num_threads(1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent over the 2B views of one pair of batches: one slice of ``nt_xent_views``."""
    return nt_xent_views(torch.cat([a, b]).unsqueeze(0), temperature)


def test_mixed_probs_mixes_logits_not_probabilities():
    zt = torch.tensor([[4.0, 0.0]])
    zs = torch.tensor([[0.0, 2.0]])
    q = mixed_probs(zt, zs, 0.25)
    assert torch.allclose(q, F.softmax(torch.tensor([[1.0, 1.5]]), 1))
    p_mix = 0.25 * F.softmax(zt, 1) + 0.75 * F.softmax(zs, 1)
    assert not torch.allclose(q, p_mix)


def test_class_thresholds_for_given_counts():
    pred = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)  # N = [8, 4, 2, 0]
    thr = class_thresholds(pred, 4, 0.95)
    sig = torch.tensor([1.0, 0.5, 0.25, 0.0])
    assert torch.allclose(thr, 0.95 * sig / (2 - sig))
    assert thr[0] == pytest.approx(0.95)
    assert thr[1] == pytest.approx(0.95 * 0.5 / 1.5)
    assert thr[3] == 0.0


def test_selected_set():
    # class 0 predicted 3x, class 1 once: tau_0 = 0.9, tau_1 = 0.9 * (1/3)/(5/3) = 0.18
    q = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.91, 0.09], [0.30, 0.70]])
    keep, pred, thr = select_confident(q, 0.9)
    assert thr.tolist() == pytest.approx([0.9, 0.18])
    assert pred.tolist() == [0, 0, 0, 1]
    assert keep.tolist() == [True, False, True, True]


def test_disagreement_weights_range_and_detach():
    zs = torch.randn(64, 10, requires_grad=True)
    zt = torch.randn(64, 10)
    w = disagreement_weights(zs, zt)
    assert not w.requires_grad
    assert (w >= 0.5).all() and (w < 1).all()
    assert disagreement_weights(zt, zt).tolist() == pytest.approx([0.5] * 64)
    big = disagreement_weights(zt + 3, zt)
    assert (big > 0.99).all() and (big < 1).all()
    assert torch.allclose(w, torch.sigmoid((zs - zt).norm(dim=1)))


def test_weighted_feature_mse_hand_value():
    fs = torch.zeros(2, 1, 1, 2)
    ft = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])
    w = torch.tensor([0.5, 1.0])
    # sample 0: mean sq = 1 -> 0.5; sample 1: (4 + 0)/2 = 2 -> 2; mean over all elements = (0.5*2 + 1*4)/4
    assert weighted_feature_mse(fs, ft, w).item() == pytest.approx((0.5 * 2 + 4) / 4)
    assert weighted_feature_mse(fs, ft, None).item() == pytest.approx(6 / 4)


def test_match_spatial_pools_the_larger_map():
    a, b = match_spatial(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 4, 4))
    assert a.shape == b.shape == (2, 3, 4, 4)
    a, b = match_spatial(torch.ones(2, 3, 2, 2), torch.ones(2, 3, 4, 4))
    assert a.shape == b.shape == (2, 3, 2, 2)


def test_mix_distribution_moves_channel_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) \
        + torch.arange(4.0).view(4, 1, 1, 1)
    perm = torch.tensor([1, 2, 3, 0])
    mu = x.mean(dim=(2, 3))
    sig = (x.var(dim=(2, 3)) + 1e-6).sqrt()
    # lam -> 0: each image takes its partner's per-channel mean and std
    out = mix_distribution(x, lam=torch.zeros(4), perm=perm)
    assert out.shape == x.shape
    assert torch.allclose(out.mean(dim=(2, 3)), mu[perm], atol=1e-4)
    assert torch.allclose((out.var(dim=(2, 3)) + 1e-6).sqrt(), sig[perm], atol=1e-3)
    # lam = 1: unchanged; lam = 0.3: statistics are the convex mix
    assert torch.allclose(mix_distribution(x, lam=torch.ones(4), perm=perm), x, atol=1e-4)
    lam = torch.full((4,), 0.3)
    out = mix_distribution(x, lam=lam, perm=perm)
    assert torch.allclose(out.mean(dim=(2, 3)), 0.3 * mu + 0.7 * mu[perm], atol=1e-4)
    assert torch.allclose((out.var(dim=(2, 3)) + 1e-6).sqrt(), 0.3 * sig + 0.7 * sig[perm], atol=1e-3)
    # random lam ~ Beta(0.1, 0.1): mostly near 0 or 1
    torch.manual_seed(0)
    lam = torch.distributions.Beta(0.1, 0.1).sample((2000,))
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.6
    assert mix_distribution(x).shape == x.shape


def test_nt_xent_equals_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    t = 0.3
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = (z @ z.t()).tolist()
    total = 0.0
    for i in range(4):
        pos = (i + 2) % 4
        denom = sum(math.exp(sim[i][k] / t) for k in range(4) if k != i)
        total += -math.log(math.exp(sim[i][pos] / t) / denom)
    assert nt_xent(a, b, t).item() == pytest.approx(total / 4, rel=1e-5)
    # perfect positives give a lower loss than random pairs
    x = torch.randn(16, 8)
    assert nt_xent(x, x + 0.01, 0.3) < nt_xent(x, torch.randn(16, 8), 0.3)


def _nt_xent_per_pair(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The plain SimCLR formula as kd3 had it before the batched form: one [2B, 2B] similarity matrix."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = z @ z.t() / t
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


@pytest.mark.parametrize("p,n,d,t", [(1, 2, 2, 0.3), (2, 16, 128, 0.5), (3, 64, 128, 0.1), (3, 7, 33, 1.0)])
def test_nt_xent_views_equals_the_sum_of_per_pair_losses(p, n, d, t):
    """The batched NT-Xent (KD³'s two or three contrastive terms in one call) is the sum of the plain
    per-pair losses, value and gradient, on random (not normalised) embeddings."""
    g = torch.Generator().manual_seed(p * 100 + n)
    pairs = [(torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)) for _ in range(p)]
    leaves = [x.clone().requires_grad_(True) for pair in pairs for x in pair]
    want = sum(_nt_xent_per_pair(leaves[2 * i], leaves[2 * i + 1], t) for i in range(p))
    want.backward()
    g_want = [x.grad.clone() for x in leaves]
    leaves2 = [x.detach().clone().requires_grad_(True) for x in leaves]
    views = torch.stack([torch.cat([leaves2[2 * i], leaves2[2 * i + 1]]) for i in range(p)])
    got = nt_xent_views(views, t)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(leaves2, g_want):
        torch.testing.assert_close(a.grad, b, rtol=1e-4, atol=1e-7)
    # the two-argument form is the P = 1 case
    assert nt_xent(*pairs[0], t).item() == pytest.approx(_nt_xent_per_pair(*pairs[0], t).item(), rel=1e-6)


def test_kd_loss_hand_value_and_zero_at_match():
    zt = torch.tensor([[2.0, 0.0]])
    zs = torch.tensor([[0.0, 0.0]])
    T = 4.0
    pt = F.softmax(zt / T, 1)[0]
    ps = torch.tensor([0.5, 0.5])
    want = float((pt * (pt / ps).log()).sum()) * T * T
    assert kd_loss(zs, zt, T).item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-6)


def test_dfnd_q_matrix_rows_sum_to_one():
    theta = torch.randn(5, 5, requires_grad=True)
    Q = noise_adaptation_matrix(theta, 0.8)
    assert torch.allclose(Q.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(torch.diagonal(Q), torch.full((5,), 0.8))
    assert (Q >= 0).all()
    z = torch.randn(3, 5)
    loss = noisy_nll(z, Q, torch.tensor([0, 1, 2]))
    loss.backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0  # off-diagonal is learnable
    assert torch.allclose(torch.diagonal(theta.grad), torch.zeros(5))
    # Q = identity (acc 1): the NLL is plain cross-entropy
    eye_q = noise_adaptation_matrix(torch.zeros(5, 5), 1.0)
    assert noisy_nll(z, eye_q, torch.tensor([0, 1, 2])).item() == pytest.approx(
        F.cross_entropy(z, torch.tensor([0, 1, 2])).item(), rel=1e-5)


def test_deployed_cost_counts_flops_and_times_the_forward():
    """FLOPs per image of a known net (2 per multiply-add), params, and a CPU latency per batch size."""
    import torch.nn as nn

    from distill.models import deployed_cost

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    c = deployed_cost(net, 4, batches=(1, 8), repeats=3)
    assert c["params"] == 48 * 10 + 10 and c["flops_per_image"] == 2 * 48 * 10
    assert c["cpu_latency_ms_b1"] > 0 and c["cpu_latency_ms_b8"] > 0
    assert next(net.parameters()).requires_grad  # the model itself is untouched (a copy is measured)


def test_cnn_mini_width_reaches_kd3s_deployed_size_and_ln_models_have_no_batch_statistics():
    """`distill.student_settings: {width: 1.56}` gives KD a student at least as large as KD³'s export on the
    demo (backbone + projector + the teacher's classifier: 192,474 parameters); the *_ln models normalise
    without running statistics (a teacher whose selection cannot read BN statistics)."""
    import torch.nn as nn

    from distill.models import count_params, create_model
    from pipeline.core.config import load_config
    from pipeline.core.errors import ConfigError

    assert count_params(create_model("cnn_mini", 10)) == 80_154
    assert count_params(create_model("cnn_mini", 10, width=1.56)) >= 192_474
    cfg = load_config(None, {"name": "x", "classes": ["a", "b"],
                             "distill": {"student": "cnn_mini", "student_settings": {"width": 1.56}}})
    assert cfg.distill.student_settings == {"width": 1.56}
    with pytest.raises(ConfigError, match="distill.student_settings.width"):
        load_config(None, {"name": "x", "classes": ["a", "b"],
                           "distill": {"student": "cnn_mini", "student_settings": {"width": 0}}})
    ln = create_model("cnn_small_ln", 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ln.modules())
    x = torch.randn(4, 3, 32, 32)
    assert ln(x).shape == (4, 10) and count_params(ln) == count_params(create_model("cnn_small", 10))
