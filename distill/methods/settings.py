"""The built-in methods' settings (``distill.<method>``), beside their code and free of torch: the entry points
``kd3.methods`` name these classes, so the config validates a method's section (and ``kd3 --help`` lists it)
without importing torch; each names its method in ``implementation``. A method of another package may
instead carry its settings as its ``Settings`` attribute (pipeline/core/plugins.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pipeline.core.plugin_settings import Settings


class Kd3Settings(Settings):
    """``distill.kd3``: KD3 (docs/METHOD.md, :mod:`.kd3`); the switches are the ablations and the paper-prose options."""

    implementation: ClassVar[str] = "distill.methods.kd3:KD3"
    moved_keys: ClassVar[dict[str, str]] = {k: f"kd3.{k}" for k in (
        "tau", "ramp_frac", "cut_frac", "lambda_con", "con_temperature", "selection", "weighting", "sharing",
        "mixdist", "cross_contrastive", "mix_level", "classifier_align_loss")}

    tau: float = Field(0.95, gt=0, le=1, description="base confidence threshold")
    ramp_frac: float = Field(2 / 3, gt=0, description="E_ramp as a fraction of epochs")
    cut_frac: float = Field(1 / 2, ge=0, description="E_cut as a fraction of epochs")
    lambda_con: float = Field(0.001, ge=0, description="weight of the contrastive loss")
    con_temperature: float = Field(0.3, gt=0, description="NT-Xent temperature")
    selection: bool = Field(True, description="dynamic instance selection")
    weighting: bool = Field(True, description="disagreement weights on the feature loss")
    sharing: bool = Field(True, description="teacher-classifier sharing")
    mixdist: bool = Field(True, description="MixDistribution + contrastive alignment")
    cross_contrastive: bool = Field(False, description="paper-prose option: student x~ <-> teacher x")
    teacher_contrastive: bool = Field(False, description="the release's teacher NT-Xent term g_T(h_T(x)) <-> "
                                                          "g_T(h_T(x~)): it trains only g_T, which nothing the "
                                                          "student computes uses, so off (default) skips the "
                                                          "teacher's pass on x~ and trains the same student; on "
                                                          "= the release's loss value")
    mix_level: Literal["input", "feature"] = Field(
        "feature", description="where MixDistribution acts: feature = the student's last feature map (kd3's default: "
                               "no second student pass, ~1.2x a KD step; as good as input on both shift levels, "
                               "docs/BENCHMARKS.md); input = the input batch (the release)")
    classifier_align_loss: bool = Field(False, description="paper-prose option: align classifiers by a loss")
    kd_temperature: float = Field(4.0, gt=0, description="temperature of kd3's KD terms (the no-sharing "
                                                         "ablation's, and kd_weight's)")
    # kd3's own parts (docs/METHOD.md "kd3's own parts"; the release's method: selection_rule confidence,
    # equal_steps false)
    selection_rule: Literal["bn", "confidence", "bn+confidence", "anchors"] = Field(
        "bn", description="what a selection keeps: bn = the images the teacher's BatchNorm statistics call "
                          "in-distribution (kd3's default); confidence = the release's class-adaptive confidence "
                          "thresholds on the mixed prediction; bn+confidence = the release's rule over the bn images; "
                          "anchors = as bn, the reference being the teacher's activation statistics on "
                          "distill.anchor_dir (a few original images per class; any architecture, LayerNorm too). "
                          "A teacher without BatchNorm statistics: bn falls back to anchors when distill.anchor_dir "
                          "is set, else to confidence (a warning names it)")
    id_rule: Literal["gmm", "quantile"] = Field(
        "gmm", description="bn rules: which images count as in-distribution: gmm = the low component of a 2-Gaussian fit "
                           "to the pool's log scores; quantile = the id_keep share per predicted class")
    id_keep: float = Field(0.5, gt=0, le=1, description="id_rule quantile: share kept per predicted class")
    kd_weight: float = Field(0.0, ge=0, description="weight of a logit KD term on the selected images (0 = off)")
    equal_steps: bool = Field(True, description="train each epoch for as many steps as a pass over the whole pool "
                                                 "(the selection cycled), so selecting costs no SGD steps")
    fused_views: bool = Field(False, description="mix_level input: one student forward on cat(x, x~) instead of two "
                                                 "(faster on a GPU; BatchNorm then normalises both views together)")
    export: Literal["full", "compact"] = Field(
        "full", description="what student.pt holds: full = backbone + projector + the teacher's classifier (the "
                            "release); compact = the student architecture alone, at its own size: its own "
                            "classifier is trained alongside, on the pooled backbone features (detached, so the "
                            "backbone learns exactly as under full), to reproduce the full head's logits by KD")
    view_share: float = Field(1.0, gt=0, le=1, description="share of each batch whose MixDistribution copy x~ "
                                                            "the student sees and the contrastive terms pair "
                                                            "(the first rows of the shuffled batch; 1 = the "
                                                            "release): a cheaper step, other maths")


class KdSettings(Settings):
    """``distill.kd``: Hinton KD (:mod:`.kd`)."""

    implementation: ClassVar[str] = "distill.methods.kd:KD"
    moved_keys: ClassVar[dict[str, str]] = {"kd_temperature": "kd.temperature (and dfnd.temperature, kd3.kd_temperature)"}

    temperature: float = Field(4.0, gt=0, description="KD temperature")


class DfndSettings(Settings):
    """``distill.dfnd``: DFND (Chen et al., CVPR 2021; :mod:`.dfnd`)."""

    implementation: ClassVar[str] = "distill.methods.dfnd:DFND"
    moved_keys: ClassVar[dict[str, str]] = {"dfnd_keep": "dfnd.keep"}

    keep: float = Field(0.5, gt=0, le=1, description="fraction of the web pool kept")
    temperature: float = Field(4.0, gt=0, description="KD temperature")
