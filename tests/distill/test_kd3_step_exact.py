"""The KD³ training step computes the release's maths, whatever it does to go faster (the teacher on both
views in one call and pooled once, each contrastive head once on both views, the NT-Xent terms in one
batched call, channels_last): a reference written out term by term, every view through every net on its
own, gives the same losses and the same gradient for every trainable parameter, on fixed inputs."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distill.methods import create_method
from distill.methods.losses import match_spatial, mix_distribution
from distill.models import create_model
from distill.methods.settings import Kd3Settings as Kd3Config

torch.set_num_threads(1)


def ntxent_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR NT-Xent written out: for each of the 2n rows, -log softmax of its positive among the others."""
    n = len(a)
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / t
    pos = torch.cat([sim.diagonal(n), sim.diagonal(-n)])  # (i, n + i) and (n + i, i)
    others = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return (torch.logsumexp(others, dim=1) - pos).mean()


def reference_losses(m, x: torch.Tensor, cfg: Kd3Config) -> dict:
    """KD3_SPEC §3–§5, one net call per view, one head call per vector (draws the same randomness as the
    method when the RNG is seeded alike: MixDistribution's Beta and permutation come first)."""
    S, T = m.student, m.teacher
    feature_mix = cfg.mix_level == "feature"
    k = math.ceil(cfg.view_share * len(x))  # view_share: only the first k images get a copy x~
    x_aug = None if feature_mix else mix_distribution(x)[:k]
    fs = S.forward_features(x)
    fs_aug = None if feature_mix else S.forward_features(x_aug)
    with torch.no_grad():
        ft = T.forward_features(x)
        ft_aug = None if feature_mix else T.forward_features(x_aug)
        z_t = T.classifier(T.pool(ft))
    if feature_mix:
        lam = torch.distributions.Beta(0.1, 0.1).sample((len(x),))
        perm = torch.randperm(len(x))
        fs_aug, ft_aug = mix_distribution(fs, lam=lam, perm=perm)[:k], mix_distribution(ft, lam=lam, perm=perm)[:k]
    src, target = match_spatial(fs, ft)
    fs_p = m.projector(src)
    z_s = F.linear(F.adaptive_avg_pool2d(fs_p, 1).flatten(1), T.classifier.weight, T.classifier.bias)
    w = torch.sigmoid((z_s - z_t).norm(dim=1)).detach() if cfg.weighting else torch.ones(len(x))
    feat = (w.view(-1, 1, 1, 1) * (fs_p - target) ** 2).mean()
    h_s, h_s_aug, h_t, h_t_aug = S.pool(fs[:k]), S.pool(fs_aug), T.pool(ft[:k]), T.pool(ft_aug)
    t = cfg.con_temperature
    con = ntxent_by_hand(m.g_s(h_s), m.g_s(h_s_aug), t)
    if cfg.teacher_contrastive:  # the release's teacher term (it trains only g_T)
        con = con + ntxent_by_hand(m.g_t(h_t), m.g_t(h_t_aug), t)
    if cfg.cross_contrastive:
        con = con + ntxent_by_hand(m.g_s(h_s_aug), m.g_t(h_t), t)
    return {"feat": feat, "con": con}


def losses_and_grads(m, fn) -> tuple[dict, dict]:
    torch.manual_seed(1)
    losses = fn()
    m.zero_grad(set_to_none=True)
    m.total_loss(losses).backward()
    grads = {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
    return {k: v.item() for k, v in losses.items()}, grads


_INPUT = {"mix_level": "input"}  # the release's MixDistribution (the default mixes the student's feature map)


@pytest.mark.parametrize("options", [{}, _INPUT, {"cross_contrastive": True, **_INPUT}, {"cross_contrastive": True},
                                     {"weighting": False, **_INPUT}, {"channels_last": True, **_INPUT},
                                     {"teacher_contrastive": True, **_INPUT},
                                     {"teacher_contrastive": True, "cross_contrastive": True, **_INPUT},
                                     {"teacher_contrastive": True}, {"view_share": 0.25, **_INPUT},
                                     {"view_share": 0.5, "teacher_contrastive": True, "cross_contrastive": True, **_INPUT},
                                     {"view_share": 0.25, "teacher_contrastive": True},
                                     {"view_share": 0.5, "channels_last": True, **_INPUT}, {"channels_last": True}])
def test_kd3_step_losses_and_gradients_equal_the_reference(options):
    options = dict(options)
    channels_last = options.pop("channels_last", False)
    cfg = Kd3Config(**options)
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 5).eval()  # 192 channels at 4x4
    for p in teacher.parameters():
        p.requires_grad_(False)
    m = create_method("kd3", create_model("cnn_tiny", 5), teacher, cfg, 5, student_arch="cnn_tiny")  # 32 at 8x8
    ref = copy.deepcopy(m)  # the same weights; BN batch statistics make each call independent of the other
    x = torch.randn(12, 3, 32, 32)
    if channels_last:
        m.to(memory_format=torch.channels_last)
        m._teacher = [copy.deepcopy(teacher).to(memory_format=torch.channels_last)]
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    got, g_got = losses_and_grads(m, lambda: m(xin))
    want, g_want = losses_and_grads(ref, lambda: reference_losses(ref, x, cfg))
    assert got.keys() == want.keys() == {"feat", "con"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-4, atol=1e-6, msg=k)


def _record_batches(net, sink: list) -> None:
    """Append the batch size of every ``net.forward_features`` call to ``sink``."""
    orig = net.forward_features
    net.forward_features = lambda x: (sink.append(x.shape[0]), orig(x))[1]


def _train(cfg: Kd3Config, steps: int = 4):
    """A few SGD steps of KD³ from a fixed start; the teacher's batch sizes and the final state."""
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 5).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    seen = []
    _record_batches(teacher, seen)
    m = create_method("kd3", create_model("cnn_tiny", 5), teacher, cfg, 5, student_arch="cnn_tiny")
    g_t0 = copy.deepcopy(m.g_t.state_dict())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    m.train()
    teacher.eval()
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        opt.zero_grad(set_to_none=True)
        m.total_loss(m(x)).backward()
        opt.step()
    return m, seen, g_t0, torch.get_rng_state()


def test_teacher_contrastive_term_trains_only_g_t_so_skipping_it_trains_the_same_student():
    # input mix (the release's): the teacher's term is a pass on the mixed input batch x~
    on, seen_on, _, rng_on = _train(Kd3Config(teacher_contrastive=True, mix_level="input"))
    off, seen_off, g_t0, rng_off = _train(Kd3Config(mix_level="input"))
    assert seen_on == [16] * 4 and seen_off == [8] * 4  # off: the teacher never sees x~
    assert torch.equal(rng_on, rng_off)  # the same random draws: data order and MixDistribution stay put
    student = {k: v for k, v in on.state_dict().items() if not k.startswith("g_t.")}
    for k, v in off.state_dict().items():
        if k.startswith("g_t."):
            assert torch.equal(v, g_t0[k[4:]]), k  # frozen: nothing trains it
            assert not torch.equal(v, on.state_dict()[k]), k  # the release's term does train it
        else:
            torch.testing.assert_close(v, student[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("share,teacher_term,want_student,want_teacher", [
    (1.0, False, [12, 12], [12]), (0.25, False, [12, 3], [12]), (0.25, True, [12, 3], [15]),
    (0.01, False, [12, 2], [12])])  # at least 2 copies: NT-Xent needs a negative
def test_view_share_gives_only_the_first_rows_a_copy(share, teacher_term, want_student, want_teacher):
    """The cost knob: the student's second call (and the teacher's, with its term) shrinks to the share."""
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 5).eval()
    student = create_model("cnn_tiny", 5)
    calls = {"s": [], "t": []}
    _record_batches(student, calls["s"])
    _record_batches(teacher, calls["t"])
    m = create_method("kd3", student, teacher, Kd3Config(view_share=share, teacher_contrastive=teacher_term,
                                                         mix_level="input"), 5, student_arch="cnn_tiny")
    m.t_hw = (4, 4)  # skip the one-image probe of the teacher's map size
    out = m(torch.randn(12, 3, 32, 32))
    assert calls == {"s": want_student, "t": want_teacher}
    assert torch.isfinite(out["con"]) and out["con"].item() > 0
