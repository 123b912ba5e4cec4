"""KD³ (Tang et al., ICCV 2023) as docs/METHOD.md describes it: the release's formulas and initialisation,
with kd3's own selection by default. The class reads in the doc's order: part 1, which web images to learn
from (``select``); part 2, the teacher's features through the teacher's classifier (``_align``); part 3,
MixDistribution and the contrastive term (``_input_views``, ``_contrast``); then the step that joins them
(``forward``) and the export.

Defaults (``distill.kd3``): ``selection_rule: bn`` (train on the images the teacher's BatchNorm statistics
call in-distribution, :mod:`.idscore`), ``equal_steps: true`` (an epoch keeps a whole-pool pass's step
count) and ``mix_level: feature`` (MixDistribution on the student's last feature map: no second student pass)
are kd3's own, chosen on the ranked benchmark (docs/BENCHMARKS.md); ``selection_rule: confidence`` with
``equal_steps: false`` and ``mix_level: input`` is the release's method. Ablations: ``selection``,
``weighting``, ``sharing``, ``mixdist``; paper-prose options (off): ``cross_contrastive``,
``classifier_align_loss``; others (off): ``kd_weight`` (a logit KD term), ``fused_views``, ``view_share`` < 1
(x~ for the first rows of a batch only: a cheaper step), ``export: compact`` (student.pt at the student's own
size: its own classifier fitted alongside to the full head's logits);
``teacher_contrastive`` (off) keeps the release's teacher NT-Xent term, which trains only g_T and so cannot
change the student: off, the teacher skips x~. With ``sharing``
off and no ``classifier_align_loss`` the student keeps its own classifier, trained by a KD term (``kd``)
so the ablated student still predicts; the release has no such term because it always shares.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import Kd3Student, Projector, pool_to
from ._registry import register_method
from .base import Method, Selection
from .idscore import anchor_reference, bn_scores, has_bn_statistics, has_norm_layers, in_distribution_mask, \
    norm_layers
from .losses import (alpha_schedule, disagreement_weights, kd_loss, match_spatial, mix_distribution, mixed_probs,
                     nt_xent_views, ramp_epochs, select_confident, view_rows, weighted_feature_mse)
from .settings import Kd3Settings

log = logging.getLogger("kd3.distill")

HEAD_DIM = 128


@register_method("kd3")
class KD3(Method):
    Settings = Kd3Settings

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        cfg = self.cfg
        if not getattr(self.teacher, "has_features", True):
            self.teacher.classifier  # raises: a TorchScript teacher without forward_features/classifier
        c_s = self.student.feature_dim
        c_t = self.teacher.feature_dim
        self.c_t = c_t
        self.projector = Projector(c_s, c_t)
        self.align = bool(cfg.classifier_align_loss)
        self.share = bool(cfg.sharing) and not self.align
        self.own_head = not self.share and not self.align  # ablation: the student's own classifier + KD
        # export compact: the student's own classifier learns the full head's logits on detached features
        self.compact = cfg.export == "compact" and not self.own_head
        if self.align:
            self.cls_s = nn.Linear(c_t, self.num_classes)
        if not self.own_head and not self.compact:
            # the student's own classifier is never used: freeze it (also keeps DDP free of unused grads)
            for p in self.student.classifier.parameters():
                p.requires_grad_(False)
        if cfg.mixdist:
            self.g_s = nn.Linear(c_s, HEAD_DIM)
            self.g_t = nn.Linear(c_t, HEAD_DIM)  # built in every case: the same RNG draws, the same state dict
        # the teacher's own NT-Xent term trains only g_T; unless the cross term feeds g_T into the student's
        # loss, g_T then never touches the student: skip the term and the teacher's pass on x~, freeze g_T
        self.teacher_term = bool(cfg.mixdist and cfg.teacher_contrastive)
        if cfg.mixdist and not (self.teacher_term or cfg.cross_contrastive):
            for p in self.g_t.parameters():
                p.requires_grad_(False)
        self.loss_weights = {"con": float(cfg.lambda_con)}
        self.kd_term = self.own_head or float(cfg.kd_weight) > 0
        if float(cfg.kd_weight) > 0:
            self.loss_weights["kd"] = float(cfg.kd_weight)
        self.rule = cfg.selection_rule
        # a teacher without BN statistics: the bn rule falls back at the first selection, to the anchors rule
        # when distill.anchor_dir gives anchor images (measured at least as good as KD on both levels with a
        # LayerNorm teacher), else to the release's confidence rule (level with KD); docs/BENCHMARKS.md
        self.bn_fallback = "bn" in self.rule and not has_bn_statistics(self.teacher)
        if self.rule == "anchors":
            norm_layers(self.teacher)  # refused now, in one line, when there is nothing to compare
        # selection_rule anchors: the trainer sets this to the anchor images' batches (distill.anchor_dir)
        self.anchor_batches = None
        # per pool image, from one teacher pass (the teacher is frozen): the bn score and the teacher's logits
        self.id_scores: torch.Tensor | None = None
        self.id_logits: torch.Tensor | None = None
        self.t_hw: tuple[int, int] | None = None  # the teacher map's H x W (seen at the first forward)
        self.s_hw: tuple[int, int] | None = None  # the student map's

    # -------------------------------- part 1: choosing which web images to learn from (docs/METHOD.md)
    def select(self, epoch, epochs, infer):
        """Part 1 with ``selection_rule``: the release's confidence rule, the in-distribution images by the
        teacher's BN statistics or by its statistics on the anchor images (one teacher pass, then fixed),
        or the release's rule over the BN-kept ones."""
        cfg = self.cfg
        if not cfg.selection:
            return Selection(None, None, {"alpha": None})
        if self.bn_fallback:
            self._fall_back()
        log: dict = {"alpha": None}
        scored = "bn" in self.rule or self.rule == "anchors"
        if scored:
            if self.id_scores is None:  # again after a resume: the pass must not move the RNG streams
                with torch.random.fork_rng(devices=[]):
                    refs = None if self.rule != "anchors" else anchor_reference(self.teacher, self.anchor_batches())
                    self.id_scores, self.id_logits = bn_scores(self.teacher, infer, refs)
            pred = self.id_logits.argmax(dim=1)
            keep, log["id"] = in_distribution_mask(self.id_scores, cfg.id_rule, cfg.id_keep, pred, self.num_classes)
        if "confidence" in self.rule:
            q, log["alpha"] = self._mixed_probs(epoch, epochs, infer)
            pred = q.argmax(dim=1)
            cand = keep if scored else torch.ones(len(q), dtype=torch.bool)
            # the release's rule over the candidates: class-adaptive thresholds from their predicted counts
            idx_c = torch.nonzero(cand).flatten()
            k, _, thr = select_confident(q[idx_c], cfg.tau)
            keep = torch.zeros_like(cand)
            keep[idx_c[k]] = True
            log["thresholds"] = thr.tolist()
        log["pred_counts"] = torch.bincount(pred, minlength=self.num_classes).tolist()
        return Selection(torch.nonzero(keep).flatten(), pred, log, cycle=bool(cfg.equal_steps))

    def _fall_back(self) -> None:
        """The rule for a teacher without BatchNorm statistics, said once in a warning that names it."""
        self.bn_fallback = False
        anchors = self.rule == "bn" and self.anchor_batches is not None and has_norm_layers(self.teacher)
        new = "anchors" if anchors else "confidence"
        log.warning("kd3: the teacher has no BatchNorm statistics (e.g. a TorchScript or LayerNorm model): "
                    "selection_rule %s falls back to %s", self.rule,
                    "selection_rule anchors (its statistics on distill.anchor_dir)" if anchors else
                    "the release's confidence rule (given distill.anchor_dir, a few original images per class, "
                    "it would select by selection_rule anchors, which reads any architecture)")
        self.rule = new

    def _mixed_probs(self, epoch: int, epochs: int, infer) -> tuple[torch.Tensor, float]:
        """q = softmax(alpha_e z_T + (1 - alpha_e) z_S) over the pool (training augmentation), and alpha_e."""
        cfg = self.cfg
        e_ramp, e_cut = ramp_epochs(epochs, cfg.ramp_frac, cfg.cut_frac)
        alpha = alpha_schedule(epoch, e_ramp, e_cut)

        def mixed_logits(x):
            # each net runs only when its weight is non-zero (alpha is exactly 0 after E_cut)
            if alpha >= 1.0:
                return self.teacher(x).float()
            if alpha <= 0.0:
                return self.student_logits(x).float()
            return alpha * self.teacher(x).float() + (1.0 - alpha) * self.student_logits(x).float()

        logits = infer(mixed_logits)
        return mixed_probs(logits, logits, 1.0), alpha  # logits are already mixed: q = softmax(mix)

    # -------------------------------- part 2: learning the teacher's features, through the teacher's classifier
    def _t_cls(self):
        c = self.teacher.classifier
        return c.weight.detach(), (c.bias.detach() if c.bias is not None else None)

    def head_logits(self, fs_p: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        """z_S: through the shared frozen teacher classifier (default), the aligned own
        classifier (option), or the student's own classifier (sharing ablation)."""
        if self.own_head:
            return self.student.classifier(self.student.pool(fs))
        h = F.adaptive_avg_pool2d(fs_p, 1).flatten(1)
        if self.align:
            return self.cls_s(h)
        w, b = self._t_cls()
        return F.linear(h, w.to(h.dtype), None if b is None else b.to(h.dtype))

    def _teacher_hw(self, x: torch.Tensor) -> tuple[int, int]:
        if self.t_hw is None:
            with torch.no_grad():
                self.t_hw = tuple(self.teacher.forward_features(x[:1]).shape[-2:])
        return self.t_hw

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        fs = self.student.forward_features(x)
        if self.own_head:
            return self.head_logits(None, fs)
        self.s_hw = tuple(fs.shape[-2:])
        fs_p = self.projector(pool_to(fs, self._teacher_hw(x)))
        return self.head_logits(fs_p, fs)

    def compact_logits(self, fs: torch.Tensor) -> torch.Tensor:
        """The compact export's head: the student's own classifier on its pooled features (no gradient
        reaches the backbone through it)."""
        return self.student.classifier(self.student.pool(fs).detach())

    def predict(self, x):
        """The exported model's logits (what the metrics measure)."""
        if self.compact:
            return self.compact_logits(self.student.forward_features(x))
        return self.student_logits(x)

    def _align(self, fs: torch.Tensor, ft: torch.Tensor, z_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """P(F_S) against F_T, weighted by sigmoid(||z_S - z_T||), z_S through the teacher's frozen
        classifier; and the terms of the options (kd, classifier alignment, the compact export's head)."""
        cfg, out = self.cfg, {}
        self.t_hw, self.s_hw = tuple(ft.shape[-2:]), tuple(fs.shape[-2:])
        # spatial matching as the release: a larger student map is pooled BEFORE the projector, a larger
        # teacher map is pooled to the student's size
        src, t = match_spatial(fs, ft)
        fs_p = self.projector(src)
        z_s = self.head_logits(fs_p, fs)
        if self.kd_term:  # the own-head ablation's only logit signal, or the kd_weight option
            out["kd"] = kd_loss(z_s, z_t, cfg.kd_temperature)
        if self.compact:  # trains the own classifier only: the features and z_S are detached
            out["compact"] = kd_loss(self.compact_logits(fs), z_s.detach(), cfg.kd_temperature)
        w = disagreement_weights(z_s, z_t) if cfg.weighting else None
        out["feat"] = weighted_feature_mse(fs_p, t, w)
        if self.align:
            w_t, b_t = self._t_cls()
            out["cls_align"] = F.mse_loss(self.cls_s.weight, w_t) + (
                F.mse_loss(self.cls_s.bias, b_t) if b_t is not None else 0.0)
        return out

    # -------------------------------- part 3: MixDistribution and a contrastive term
    def _input_views(self, x: torch.Tensor, k: int):
        """x~ = MixDistribution(x) for the first ``k`` rows (drawn over the whole batch: the same draws
        whatever ``k``); None when there is no input-level copy."""
        if not self.cfg.mixdist or self.cfg.mix_level == "feature":
            return None
        return mix_distribution(x)[:k]

    def _student_features(self, x: torch.Tensor, x_aug, b: int, k: int):
        """F_S(x) and F_S(x~): two calls, each view its own BN batch statistics (the release), or one call on
        both (``fused_views``)."""
        if x_aug is not None and self.cfg.fused_views:
            fs, fs_aug = self.student.forward_features(torch.cat([x, x_aug])).split([b, k])
            return fs, fs_aug
        return self.student.forward_features(x), (self.student.forward_features(x_aug) if x_aug is not None
                                                  else None)

    def _contrast(self, fs, fs_aug, ft, ht_all, b: int, k: int) -> torch.Tensor:
        """NT-Xent between g_S(h_S(x)) and g_S(h_S(x~)) (+ the teacher's and the cross terms where set); with
        ``mix_level: feature`` x~ is the student's mixed feature map (no second student pass)."""
        cfg = self.cfg
        if cfg.mix_level == "feature":
            lam = torch.distributions.Beta(0.1, 0.1).sample((b,)).to(fs.device)
            perm = torch.randperm(b).to(fs.device)
            fs_aug = mix_distribution(fs, lam=lam, perm=perm)[:k]
            if self.teacher_term:
                ht_all = torch.cat([ht_all[:b], self.teacher.pool(mix_distribution(ft, lam=lam, perm=perm)[:k])])
        # each head runs once on both views (rows: the k images, then their x~); the NT-Xent terms in one
        # batched call
        g_s = self.g_s(torch.cat([self.student.pool(fs[:k]), self.student.pool(fs_aug)]))
        views = [g_s]  # student x <-> x~
        if self.teacher_term or cfg.cross_contrastive:
            g_t = self.g_t(torch.cat([ht_all[:k], ht_all[b:]]).detach())  # rows x, then x~ when the term needs them
            if self.teacher_term:
                views.append(g_t)  # teacher x <-> x~
            if cfg.cross_contrastive:
                views.append(torch.cat([g_s[k:], g_t[:k]]))  # student x~ <-> teacher x
        return nt_xent_views(torch.stack(views), cfg.con_temperature)

    # -------------------------------- the step: the three parts' losses
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step's losses on the selected batch ``x``: part 3's second view, both nets' features,
        part 2's alignment, part 3's contrastive term (the randomness drawn in the release's order)."""
        b = x.shape[0]
        k = view_rows(b, self.cfg.view_share)  # rows with a copy x~ (all of them unless the view_share option)
        x_aug = self._input_views(x, k)
        fs, fs_aug = self._student_features(x, x_aug, b, k)
        with torch.no_grad():  # the frozen teacher (eval-mode BN) takes x~ only when its own term needs it
            ft_all = self.teacher.forward_features(torch.cat([x, x_aug]) if x_aug is not None and self.teacher_term
                                                   else x)
            ht_all = self.teacher.pool(ft_all)  # pooled once: z_T and the teacher's contrastive head share it
            z_t = self.teacher.classifier(ht_all[:b])
        out = self._align(fs, ft_all[:b], z_t)
        if self.cfg.mixdist:
            out["con"] = self._contrast(fs, fs_aug, ft_all[:b], ht_all, b, k)
        return out

    # -------------------------------- export
    def export(self):
        if self.own_head or self.compact:
            return self.student_arch, dict(self.student_kwargs), self.student
        kwargs = {"student": self.student_arch, "teacher_dim": int(self.c_t), "student_kwargs": self.student_kwargs}
        if self.t_hw is not None and self.s_hw is not None and self.s_hw[0] * self.s_hw[1] > self.t_hw[0] * self.t_hw[1]:
            kwargs["feat_size"] = [int(v) for v in self.t_hw]
        dep = Kd3Student(self.num_classes, self.student_arch, self.c_t, self.student_kwargs, kwargs.get("feat_size"))
        sd = {k: v for k, v in self.student.state_dict().items() if not k.startswith("classifier.")}
        missing, unexpected = dep.backbone.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        dep.projector.load_state_dict(self.projector.state_dict())
        src = self.cls_s if self.align else self.teacher.classifier
        dep.classifier.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()})
        dep.to(next(self.student.parameters()).device)
        return "kd3_student", kwargs, dep

    def extra_state(self):
        # the map sizes decide the export's pooling: kept across a resume that goes straight to export
        return {"t_hw": list(self.t_hw) if self.t_hw else None, "s_hw": list(self.s_hw) if self.s_hw else None}

    def load_extra_state(self, d):
        self.t_hw = tuple(d["t_hw"]) if d.get("t_hw") else None
        self.s_hw = tuple(d["s_hw"]) if d.get("s_hw") else None
