"""A throwaway kd3 plugin package installed for the session: a ``*.dist-info`` with ``entry_points.txt`` and
its module in a temp folder on ``sys.path`` (per test module); and the distill tests' tiny digits teacher + web pool."""
from __future__ import annotations

import sys
import textwrap

import pytest
from testlib import TESTS, load_module

digits_world = load_module(TESTS / "distill" / "conftest.py", "kd3_distill_conftest").digits_world

ENTRY_POINTS = """\
[kd3.methods]
toykd = kd3toy:ToyKD

[kd3.models]
toy_net = kd3toy:toy_net

[kd3.sources]
toy = kd3toy:ToySource

[kd3.embedders]
toyemb = kd3toy:ToyEmbedder
"""

MODULE = '''
"""kd3toy: a method, a student architecture, a crawl source and an embedding backend, each with its own
settings, in one file."""
from typing import Optional

import torch.nn as nn
from pydantic import Field

from crawlers.source import Candidate, Source
from pipeline.core.embedding import Embedder, normalise
from distill.methods import Method
from distill.methods.losses import kd_loss
from distill.models import Backbone
from pipeline.core.errors import ConfigError
from pipeline.core.plugin_settings import Settings


class ToyKDSettings(Settings):
    temperature: float = Field(2.0, gt=0, description="toykd: KD temperature")
    weight: float = Field(1.0, gt=0, description="toykd: weight of its one loss")


class ToyKD(Method):
    """Hinton KD under another name, its loss named toy_kd and scaled by distill.toykd.weight."""

    Settings = ToyKDSettings
    seen = []  # the settings each instance was built with

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        ToyKD.seen.append(self.cfg)

    def forward(self, x):
        return {"toy_kd": self.cfg.weight * kd_loss(self.student(x), self.teacher_logits(x), self.cfg.temperature)}


class ToyNetSettings(Settings):
    width: int = Field(8, gt=0, le=64, description="toy_net: channels")


class ToyNet(Backbone):
    def __init__(self, num_classes, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.body(x)


def toy_net(num_classes, **settings):
    return ToyNet(num_classes, **settings)


toy_net.Settings = ToyNetSettings


class ToySourceSettings(Settings):
    toy_urls: Optional[dict[str, list[str]]] = Field(None, description="toy: image URLs per class")
    toy_count: int = Field(3, gt=0, description="toy: URLs listed per class, at most")


class ToySource(Source):
    """The first ``toy_count`` of each class's ``toy_urls``."""

    Settings = ToySourceSettings

    @classmethod
    def check(cls, cfg):
        if cfg.crawl.toy_urls is None:
            raise ConfigError("source 'toy' needs crawl.toy_urls")

    def candidates(self, cls, cfg):
        for url in cfg.crawl.toy_urls.get(cls, [])[:cfg.crawl.toy_count]:
            yield Candidate(url, f"toy:{cls}", self.name)


class ToyEmbedderSettings(Settings):
    toy_side: int = Field(8, gt=0, le=32, description="toyemb: images are resized to this square side")


class ToyEmbedder(Embedder):
    """Embeddings: the resized pixels, L2-normalised."""

    Settings = ToyEmbedderSettings
    backend = "toyemb"
    built_with = []

    def __init__(self, side):
        import torchvision.transforms as T

        ToyEmbedder.built_with.append(side)
        self.use_transform(T.Compose([T.Resize(side), T.CenterCrop(side), T.ToTensor()]))
        self.input_side, self.dim = side, 3 * side * side
        self.model_name, self.pretrained, self.key, self.trained = "toyemb", None, f"toyemb:{side}", True

    @classmethod
    def from_config(cls, cfg, classes, teacher):
        return cls(cfg.toy_side)

    def embed(self, batch):
        return normalise(batch.flatten(1)), None
'''


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory):
    """Install ``kd3toy`` (metadata + module on sys.path) for a test module; forget it afterwards, so no other
    test sees its settings."""
    from pipeline.core import plugins

    root = tmp_path_factory.mktemp("site")
    info = root / "kd3toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd3toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (root / "kd3toy.py").write_text(textwrap.dedent(MODULE))
    sys.path.insert(0, str(root))
    plugins.clear()
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("kd3toy", None)
    plugins.clear()
