"""Model registry with one uniform interface (timm-like).

Every model has ``forward_features(x) -> F (B,C,H,W)``, ``pool(F) -> h (B,C)``,
``classifier: nn.Linear``, ``feature_dim`` and ``forward(x) = classifier(pool(forward_features(x)))``.

Built in: CIFAR-style ResNet-18/34 (3x3 stem, no max-pool), resnet8x4/resnet32x4 (CRD style),
wrn_16_2/wrn_40_2, mobilenetv2 (CIFAR strides), cnn_small (~0.3M params); ``timm:<name>`` and
``torchvision:<name>`` wrap those libraries (random init; weights come from a checkpoint).
``kd3_student`` is the deployable KD³ student: backbone + projector + the teacher's classifier.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from pipeline.core import plugins
from pipeline.core.errors import ConfigError
from pipeline.core.plugin_settings import PluginSettingsError, Settings, validate_settings

MODELS = plugins.Registry("kd3.models", "architecture")
register = MODELS.register


def list_models() -> list[str]:
    """The built-in registry (other packages' models: ``plugins.names("kd3.models")``)."""
    return sorted(MODELS.builtin) + ["timm:<name>", "torchvision:<name>"]


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """A registered architecture, ``timm:<name>``, ``torchvision:<name>``, or a ``kd3.models`` entry point (which
    may carry ``Settings``: ``kw`` are validated by them)."""
    if name.startswith("timm:"):
        return TimmWrapper(name[5:], num_classes, **kw)
    if name.startswith("torchvision:"):
        return TorchvisionWrapper(name[12:], num_classes, **kw)
    if name not in MODELS.names():
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(MODELS.names())}, timm:<name> or "
                          f"torchvision:<name>")
    factory = MODELS.get(name)
    settings = getattr(factory, "Settings", None)
    if settings is not None:  # its own settings (distill.student_settings, a checkpoint's arch_kwargs)
        try:
            kw = validate_settings(settings, kw).model_dump()
        except PluginSettingsError as e:
            raise ConfigError(f"architecture {name!r}: {e}") from None
    return factory(num_classes=num_classes, **kw)


class Backbone(nn.Module):
    """Shared parts of the uniform interface; subclasses define ``forward_features``."""

    feature_dim: int
    classifier: nn.Linear

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(f, 1).flatten(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.forward_features(x)))


def _init(m: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN weight 1 / bias 0: the CRD/mdistiller models' rule (resnet8x4,
    resnet32x4, WRN, MobileNetV2) and kd3's small CNNs. The KD3 release's own CIFAR ResNet-18/34 and its
    projector keep PyTorch's default init instead (no call to this)."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


# ---------------------------------------------------------------- CIFAR ResNets
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """ResNet with a 3x3 stride-1 stem and no max-pool (the KD³ release's CIFAR ResNet-18/34).

    ``init="torch"`` keeps PyTorch's default initialisation, as the release's ``resnet_cifar.py`` does;
    ``init="kaiming"`` applies :func:`_init` (the CRD-style resnet8x4/resnet32x4)."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, stem: int | None = None,
                 init: str = "torch"):
        super().__init__()
        stem = stem or widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            blk = []
            for j in range(n):
                blk.append(BasicBlock(cin, w, stride if j == 0 else 1))
                cin = w
            layers.append(nn.Sequential(*blk))
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)
        if init == "kaiming":
            _init(self)
        elif init != "torch":
            raise ConfigError(f"CifarResNet: unknown init {init!r} (torch, kaiming)")

    def forward_features(self, x):
        return self.layers(F.relu(self.bn1(self.conv1(x))))


@register("resnet18")
def resnet18(num_classes: int, **kw):
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


@register("resnet34")
def resnet34(num_classes: int, **kw):
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes)


@register("resnet8x4")
def resnet8x4(num_classes: int, **kw):
    # CRD / mdistiller: depth 8 -> one block per stage, widths x4 = [32, 64, 128, 256]
    return CifarResNet([1, 1, 1], [64, 128, 256], num_classes, stem=32, init="kaiming")


@register("resnet32x4")
def resnet32x4(num_classes: int, **kw):
    return CifarResNet([5, 5, 5], [64, 128, 256], num_classes, stem=32, init="kaiming")


# ---------------------------------------------------------------- Wide ResNets
class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.short is None else self.short(o))


class WideResNet(Backbone):
    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)
        _init(self)

    def forward_features(self, x):
        return F.relu(self.bn(self.blocks(self.conv1(x))))


@register("wrn_16_2")
def wrn_16_2(num_classes: int, **kw):
    return WideResNet(16, 2, num_classes)


@register("wrn_40_2")
def wrn_40_2(num_classes: int, **kw):
    return WideResNet(40, 2, num_classes)


# ---------------------------------------------------------------- MobileNetV2 (CIFAR strides)
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid),
                   nn.ReLU6(inplace=True), nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(Backbone):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int, width: float = 1.0, last: int = 1280):
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)]
        for t, ch, n, s in self.CFG:
            out = int(ch * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = int(last * max(1.0, width))
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = last
        self.classifier = nn.Linear(last, num_classes)
        _init(self)

    def forward_features(self, x):
        return self.features(x)


@register("mobilenetv2")
def mobilenetv2(num_classes: int, width: float = 1.0, **kw):
    return MobileNetV2(num_classes, width=width)


# ---------------------------------------------------------------- small CNN
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B,C,H,W) map (ConvNeXt's): no running statistics."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class SmallCNN(Backbone):
    """Four conv-norm-ReLU stages (32-64-128-192), max-pool between; ~0.3M parameters. ``norm``: ``bn``
    (BatchNorm) or ``ln`` (LayerNorm over channels, as ConvNeXt and the ViT family: a teacher without
    running statistics)."""

    def __init__(self, num_classes: int, widths=(32, 64, 128, 192), norm: str = "bn"):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        make_norm = {"bn": nn.BatchNorm2d, "ln": LayerNorm2d}[norm]
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), make_norm(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)
        _init(self)

    def forward_features(self, x):
        return self.features(x)


@register("cnn_small")
def cnn_small(num_classes: int, widths=(32, 64, 128, 192), **kw):
    return SmallCNN(num_classes, widths=tuple(widths))


class CnnMiniSettings(Settings):
    width: float = Field(1.0, gt=0, le=4, description="cnn_mini: channels x this (parameters grow ~ width^2)")


@register("cnn_mini")
def cnn_mini(num_classes: int, width: float = 1.0, **kw):
    """cnn_small at half width (~80k parameters): a 4x-compressed student of cnn_small. ``width`` scales its
    channels (``distill.student_settings: {width: 1.56}`` is KD's student at KD³'s deployed size on the demo)."""
    return SmallCNN(num_classes, widths=tuple(max(1, round(c * width)) for c in (16, 32, 64, 96)))


cnn_mini.Settings = CnnMiniSettings


@register("cnn_tiny")
def cnn_tiny(num_classes: int, **kw):
    """A few thousand parameters: for tests and benchmarks on a shared CPU."""
    return SmallCNN(num_classes, widths=(8, 16, 32))


@register("cnn_small_ln")
def cnn_small_ln(num_classes: int, **kw):
    """cnn_small with LayerNorm instead of BatchNorm."""
    return SmallCNN(num_classes, norm="ln")


@register("cnn_mini_ln")
def cnn_mini_ln(num_classes: int, **kw):
    """cnn_mini with LayerNorm instead of BatchNorm."""
    return SmallCNN(num_classes, widths=(16, 32, 64, 96), norm="ln")


@register("cnn_tiny_ln")
def cnn_tiny_ln(num_classes: int, **kw):
    """cnn_tiny with LayerNorm: no batch statistics, so several ranks compute what one process does."""
    return SmallCNN(num_classes, widths=(8, 16, 32), norm="ln")


# ---------------------------------------------------------------- timm / torchvision wrappers
def _to_map(f: torch.Tensor) -> torch.Tensor:
    """Token outputs (B,N,C) become (B,C,N,1) so the interface stays a feature map."""
    if f.dim() == 3:
        return f.transpose(1, 2).unsqueeze(-1)
    return f


class TimmWrapper(Backbone):
    def __init__(self, name: str, num_classes: int, **kw):
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover
            raise ConfigError(f"timm:{name} needs the timm package ({e})") from None
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        except Exception as e:
            raise ConfigError(f"timm cannot build {name!r}: {e}") from None
        head = self.net.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"timm:{name}: classifier is {type(head).__name__}, kd3 needs a single nn.Linear")
        self.feature_dim = head.in_features

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.net.get_classifier()

    def forward_features(self, x):
        return _to_map(self.net.forward_features(x))


def _tv_head(net: nn.Module) -> tuple[str, nn.Linear]:
    for path in ("fc", "classifier", "head", "heads"):
        mod = getattr(net, path, None)
        if isinstance(mod, nn.Linear):
            return path, mod
        if isinstance(mod, nn.Sequential) and len(mod) and isinstance(mod[-1], nn.Linear):
            if all(isinstance(x, (nn.Dropout, nn.Flatten, nn.Identity)) for x in list(mod)[:-1]):
                return f"{path}.{len(mod) - 1}", mod[-1]
            raise ConfigError(f"torchvision model {type(net).__name__}: its head is an MLP, "
                              f"kd3 needs pooled features -> one nn.Linear")
    raise ConfigError(f"torchvision model {type(net).__name__}: no final nn.Linear classifier found")


class TorchvisionWrapper(Backbone):
    def __init__(self, name: str, num_classes: int, **kw):
        super().__init__()
        import torchvision

        try:
            self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        except Exception as e:
            raise ConfigError(f"torchvision cannot build {name!r}: {e}") from None
        self._head_path, head = _tv_head(self.net)
        self.feature_dim = head.in_features

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.net.get_submodule(self._head_path)

    def forward_features(self, x):
        n = self.net
        if hasattr(n, "layer4") and hasattr(n, "conv1"):  # ResNet family
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            return n.layer4(n.layer3(n.layer2(n.layer1(x))))
        if hasattr(n, "features"):
            return _to_map(n.features(x))
        if hasattr(n, "trunk_output") and hasattr(n, "stem"):  # RegNet
            return n.trunk_output(n.stem(x))
        raise ConfigError(f"torchvision:{type(n).__name__}: feature extraction not supported")


# ---------------------------------------------------------------- KD³ projector and deployable student
def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Projector(nn.Sequential):
    """KD³ P: conv1x1(C_S->C_T/2)-BN-ReLU-conv3x3-BN-ReLU-conv1x1(->C_T)-BN-ReLU, no biases.

    PyTorch's default initialisation, as the release's ``KDDD`` module: every conv is followed by BN,
    so a larger init only shrinks the effective learning rate (∝ 1/‖W‖²)."""

    def __init__(self, c_s: int, c_t: int):
        mid = max(1, c_t // 2)
        super().__init__(*_conv_bn_relu(c_s, mid, 1), *_conv_bn_relu(mid, mid, 3), *_conv_bn_relu(mid, c_t, 1))


def pool_to(f: torch.Tensor, size) -> torch.Tensor:
    """Average-pool a student map down to the teacher's spatial ``size`` (the release pools the student
    map *before* the projector when it is larger); maps that are not larger pass unchanged."""
    if size is None:
        return f
    h, w = int(size[0]), int(size[1])
    if f.shape[-2] * f.shape[-1] > h * w:
        return F.adaptive_avg_pool2d(f, (h, w))
    return f


class Kd3Student(Backbone):
    """Deployable KD³ student: student backbone -> (pool to the teacher's map size) -> projector -> GAP
    -> the teacher's classifier."""

    def __init__(self, num_classes: int, student: str, teacher_dim: int, student_kwargs: dict | None = None,
                 feat_size: list[int] | None = None):
        super().__init__()
        self.backbone = create_model(student, num_classes, **(student_kwargs or {}))
        self.projector = Projector(self.backbone.feature_dim, teacher_dim)
        self.feature_dim = teacher_dim
        self.feat_size = list(feat_size) if feat_size else None
        self.classifier = nn.Linear(teacher_dim, num_classes)
        # the backbone's own classifier is never used by kd3; drop it so the export has one head
        if isinstance(getattr(self.backbone, "classifier", None), nn.Linear) and \
                not isinstance(self.backbone, (TimmWrapper, TorchvisionWrapper)):
            self.backbone.classifier = nn.Identity()  # type: ignore[assignment]

    def forward_features(self, x):
        f = self.backbone.forward_features(x)
        if self.feat_size:  # set only when training pooled the student map (it was larger than the teacher's)
            f = F.adaptive_avg_pool2d(f, self.feat_size)
        return self.projector(f)


@register("kd3_student")
def kd3_student(num_classes: int, student: str = "resnet18", teacher_dim: int = 512,
                student_kwargs: dict | None = None, feat_size: list[int] | None = None, **kw):
    return Kd3Student(num_classes, student, teacher_dim, student_kwargs, feat_size)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def deployed_cost(m: nn.Module, size: int, batches: tuple[int, ...] = (1, 64), repeats: int = 5) -> dict:
    """What the deployed model costs, for claims made at equal size: parameters, inference FLOPs per image
    (FlopCounterMode, 2 per multiply-add) and the median CPU latency (fp32, eval, one thread per core torch
    uses) of a forward at each batch size, in ms. Measured on a CPU copy, so a GPU run reports the same."""
    import copy
    import time

    from torch.utils.flop_counter import FlopCounterMode

    cpu = copy.deepcopy(m).float().cpu().eval()
    out: dict = {"params": count_params(cpu)}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            cpu(torch.randn(1, 3, size, size))
        out["flops_per_image"] = int(fc.get_total_flops())
        for b in batches:
            x = torch.randn(b, 3, size, size)
            cpu(x)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                cpu(x)
                times.append(time.perf_counter() - t0)
            out[f"cpu_latency_ms_b{b}"] = round(1e3 * sorted(times)[len(times) // 2], 3)
    return out
