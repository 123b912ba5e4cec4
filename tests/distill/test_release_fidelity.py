"""Where kd3's KD³ must match the authors' release (KDDD/) step for step: initialisation, spatial
matching, and the alpha schedule. Each test is on hand-made tensors/modules and fails on the old code."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods import create_method
from distill.methods.losses import alpha_schedule, ramp_epochs
from distill.models import Backbone, Projector, create_model
from distill.methods.settings import Kd3Settings as Kd3Config

torch.set_num_threads(1)


def _default_std(fan_in: int) -> float:
    """PyTorch's default conv/linear init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def _check_default_init(conv: nn.Conv2d):
    fan_in = conv.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    w = conv.weight.detach()
    assert w.abs().max() <= bound + 1e-7
    assert w.std().item() == pytest.approx(_default_std(fan_in), rel=0.1)


@pytest.mark.parametrize("c_s,c_t", [(96, 192), (512, 512), (256, 512)])
def test_projector_keeps_pytorch_default_init(c_s, c_t):
    torch.manual_seed(0)
    p = Projector(c_s, c_t)
    convs = [m for m in p if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    for c in convs:
        assert c.bias is None
        _check_default_init(c)
    for bn in (m for m in p if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_release_resnets_keep_default_init_crd_ones_kaiming():
    torch.manual_seed(0)
    r18 = create_model("resnet18", 10)
    _check_default_init(r18.conv1)                       # 3x3x3 stem
    _check_default_init(r18.layers[3][0].conv2)          # 512x512x3x3
    lin = r18.classifier
    assert lin.weight.abs().max() <= 1 / math.sqrt(lin.in_features) + 1e-7
    r8 = create_model("resnet8x4", 10)                   # CRD's resnet8x4: kaiming_normal, fan_out
    w = r8.layers[2][0].conv2.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)


def test_alpha_per_epoch_matches_the_release_table():
    # release: for epoch in 1..240: alpha = time_d(epoch, max_epoch=120) with
    #   time_d = 1 - exp(-5 ((epoch + 1)/160 - 1)^2) if epoch < 120 else 0
    def time_d(epoch, max_epoch=120):
        return 1 - math.exp(-5 * ((epoch + 1) / 160 - 1) ** 2) if epoch < max_epoch else 0.0

    e_ramp, e_cut = ramp_epochs(240, 2 / 3, 1 / 2)
    for epoch in range(1, 241):
        assert alpha_schedule(epoch - 1, e_ramp, e_cut) == pytest.approx(time_d(epoch)), epoch
    # hand values: first epoch, last epoch with the teacher in the mix, first without
    assert alpha_schedule(0, e_ramp, e_cut) == pytest.approx(1 - math.exp(-5 * (2 / 160 - 1) ** 2))
    assert alpha_schedule(118, e_ramp, e_cut) == pytest.approx(1 - math.exp(-5 * 0.0625))
    assert alpha_schedule(119, e_ramp, e_cut) == 0.0
    vals = [alpha_schedule(e, e_ramp, e_cut) for e in range(119)]
    assert all(a > b for a, b in zip(vals, vals[1:]))  # trust moves from the teacher to the student


class _FixedNet(Backbone):
    """A stand-in net whose feature map is a fixed function of the input (1x1 conv, no BN)."""

    def __init__(self, c_out: int, stride: int, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, c_out, 1, stride=stride, bias=False)
        self.feature_dim = c_out
        self.classifier = nn.Linear(c_out, num_classes)

    def forward_features(self, x):
        return F.relu(self.conv(x))


def _kd3_cfg(**kw):
    """The kd3 config section with the release's switches; MixDistribution/weighting off unless asked."""
    return Kd3Config(**{"mixdist": False, "weighting": False, **kw})


def test_larger_student_map_is_pooled_before_the_projector():
    torch.manual_seed(0)
    student = _FixedNet(6, stride=1)    # 8x8 map on an 8x8 input
    teacher = _FixedNet(4, stride=2)    # 4x4 map
    teacher.eval()
    m = create_method("kd3", student, teacher, _kd3_cfg(), 3, student_arch="x")
    m.eval()  # BN in eval mode: the projector is a fixed function
    x = torch.randn(5, 3, 8, 8)
    fs = student.forward_features(x)
    ft = teacher.forward_features(x)
    want_p = m.projector(F.adaptive_avg_pool2d(fs, (4, 4)))       # release: pool, then project
    other_p = F.adaptive_avg_pool2d(m.projector(fs), (4, 4))       # the old order: project, then pool
    assert not torch.allclose(want_p, other_p, atol=1e-4)
    want_loss = ((want_p - ft) ** 2).mean()
    got = m(x)["feat"]
    assert got.item() == pytest.approx(want_loss.item(), rel=1e-5)
    # the logits (selection, eval, export) go through the same pooled path
    w, b = teacher.classifier.weight, teacher.classifier.bias
    want_z = F.linear(want_p.mean(dim=(2, 3)), w, b)
    assert torch.allclose(m.predict(x), want_z, atol=1e-5)


def test_export_of_a_larger_student_map_pools_like_training():
    torch.manual_seed(0)
    student = create_model("cnn_tiny", 3)     # 8x8 map at 32 px
    teacher = create_model("cnn_small", 3)    # 4x4 map at 32 px
    teacher.eval()
    m = create_method("kd3", student, teacher, _kd3_cfg(mixdist=True), 3, student_arch="cnn_tiny")
    x = torch.randn(4, 3, 32, 32)
    m.train()
    m(x)                                      # one training forward: BN stats move
    m.eval()
    arch, kwargs, dep = m.export()
    assert arch == "kd3_student" and kwargs["feat_size"] == [4, 4]
    rebuilt = create_model(arch, 3, **kwargs)
    rebuilt.load_state_dict(dep.state_dict())
    rebuilt.eval()
    assert torch.allclose(rebuilt(x), m.predict(x), atol=1e-5)


def test_larger_teacher_map_is_pooled_to_the_student_size():
    torch.manual_seed(0)
    student = _FixedNet(6, stride=2)    # 4x4
    teacher = _FixedNet(4, stride=1)    # 8x8
    m = create_method("kd3", student, teacher, _kd3_cfg(), 3, student_arch="x").eval()
    x = torch.randn(3, 3, 8, 8)
    fs_p = m.projector(student.forward_features(x))
    want = ((fs_p - F.adaptive_avg_pool2d(teacher.forward_features(x), (4, 4))) ** 2).mean()
    assert m(x)["feat"].item() == pytest.approx(want.item(), rel=1e-5)


def test_fused_views_option_is_one_student_call_with_the_same_maths_in_eval_mode():
    torch.manual_seed(0)
    student, teacher = create_model("cnn_tiny", 3), create_model("cnn_small", 3).eval()
    calls = []
    orig = student.forward_features
    student.forward_features = lambda x: (calls.append(x.shape[0]), orig(x))[1]
    x = torch.randn(4, 3, 32, 32)
    out = {}
    for fused in (False, True):
        torch.manual_seed(2)  # the same projector and heads
        m = create_method("kd3", student, teacher, _kd3_cfg(mixdist=True, fused_views=fused, mix_level="input"), 3, student_arch="s")
        m.eval()  # BN on running stats: fusing the two views changes nothing but the number of calls
        calls.clear()
        torch.manual_seed(1)
        out[fused] = m(x)
        assert calls == ([8] if fused else [4, 4])
    assert out[True]["feat"].item() == pytest.approx(out[False]["feat"].item(), rel=1e-5)
    assert out[True]["con"].item() == pytest.approx(out[False]["con"].item(), rel=1e-4)
