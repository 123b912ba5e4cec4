"""DFND baseline (Chen et al., CVPR 2021) as docs/METHOD.md describes it.

Once, before the first epoch: keep the fraction ``keep`` (``distill.dfnd.keep``) of the pool with the lowest
cross-entropy of the teacher to its own argmax (= highest teacher confidence). Train with KD at
T=4 plus the NLL of the student's softmax passed through a noise-adaptation matrix Q against the
teacher's argmax. Q's diagonal is the teacher's accuracy estimate on the kept set: its mean
confidence there (the accuracy a calibrated teacher would have; no labels exist); the off-diagonal
of each row is (1 - acc) * softmax(learnable logits).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_method
from .base import Method, Selection
from .losses import kd_loss, noise_adaptation_matrix, noisy_nll
from .settings import DfndSettings


@register_method("dfnd")
class DFND(Method):
    Settings = DfndSettings

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.q_logits = nn.Parameter(torch.zeros(self.num_classes, self.num_classes))
        self.selected: torch.Tensor | None = None
        self.acc: float = 1.0

    def select(self, epoch, epochs, infer):
        if self.selected is None:
            z_t = infer(lambda x: self.teacher(x))
            p = F.softmax(z_t.float(), dim=1)
            ce = -torch.log(p.max(dim=1).values.clamp_min(1e-12))  # CE to its own argmax
            n_keep = max(1, int(round(self.cfg.keep * len(ce))))
            keep = torch.argsort(ce, stable=True)[:n_keep]
            self.selected = torch.sort(keep).values
            self.acc = float(p.max(dim=1).values[keep].mean())
        return Selection(self.selected, None, {"teacher_acc_estimate": self.acc, "one_off": True})

    def q_matrix(self) -> torch.Tensor:
        return noise_adaptation_matrix(self.q_logits, self.acc)

    def forward(self, x):
        z_t = self.teacher_logits(x)
        z_s = self.student(x)
        return {"kd": kd_loss(z_s, z_t, self.cfg.temperature),
                "nll": noisy_nll(z_s, self.q_matrix().to(z_s.device), z_t.argmax(1))}

    def extra_state(self):
        return {"selected": self.selected.tolist() if self.selected is not None else None, "acc": self.acc}

    def load_extra_state(self, d):
        if d.get("selected") is not None:
            self.selected = torch.tensor(d["selected"], dtype=torch.long)
        self.acc = float(d.get("acc", 1.0))
