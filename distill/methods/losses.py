"""The formulas of docs/METHOD.md, as small functions the unit tests check on hand-made tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- §2 dynamic selection
def ramp_epochs(epochs: int, ramp_frac: float, cut_frac: float) -> tuple[float, float]:
    """E_ramp and E_cut scaled with the epoch budget (release: 160 and 120 of 240)."""
    return ramp_frac * epochs, cut_frac * epochs


def alpha_schedule(e: int, e_ramp: float, e_cut: float) -> float:
    """alpha for the 0-based epoch ``e``, as the release computes it for its 1-based epoch ``e + 1``
    (``time_d(epoch, E_cut)`` with ``epoch`` in 1..E): 1 - exp(-5 ((epoch+1)/E_ramp - 1)^2) while
    epoch < E_cut, else 0."""
    epoch = e + 1
    if epoch >= e_cut:
        return 0.0
    return 1.0 - math.exp(-5.0 * ((epoch + 1) / e_ramp - 1.0) ** 2)


def mixed_probs(z_t: torch.Tensor, z_s: torch.Tensor, alpha: float) -> torch.Tensor:
    """q = softmax(alpha z_T + (1 - alpha) z_S): the logits are mixed, then softmaxed."""
    return F.softmax(alpha * z_t.float() + (1.0 - alpha) * z_s.float(), dim=1)


def class_thresholds(pred: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """tau_c = tau * sigma_c / (2 - sigma_c), sigma_c = N_c / max N (N_c counts all predictions)."""
    counts = torch.bincount(pred, minlength=num_classes).float()
    top = counts.max().clamp_min(1.0)
    sigma = counts / top
    return tau * sigma / (2.0 - sigma)


def select_confident(q: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (keep mask, predicted class, per-class thresholds): keep iff conf > tau_{yhat}."""
    conf, pred = q.max(dim=1)
    thr = class_thresholds(pred, q.shape[1], tau)
    return conf > thr[pred], pred, thr


# ---------------------------------------------------------------- §3 weighted feature alignment
def match_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger map down to the smaller one's size."""
    hs, ws = fs.shape[-2:]
    ht, wt = ft.shape[-2:]
    if (hs, ws) == (ht, wt):
        return fs, ft
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(fs, (ht, wt)), ft
    return fs, F.adaptive_avg_pool2d(ft, (hs, ws))


def disagreement_weights(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """w_i = sigmoid(||z_S - z_T||_2), detached; in [0.5, 1)."""
    return torch.sigmoid(torch.linalg.vector_norm((z_s - z_t).float(), dim=1)).detach()


def weighted_feature_mse(fs: torch.Tensor, ft: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """mean over batch, channels, positions of w_i (F_S' - F_T)^2."""
    d = (fs.float() - ft.float()) ** 2
    if w is not None:
        d = d * w.view(-1, *([1] * (d.dim() - 1)))
    return d.mean()


# ---------------------------------------------------------------- §4 MixDistribution + NT-Xent
def mix_distribution(x: torch.Tensor, lam: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                     alpha: float = 0.1, eps: float = 1e-6, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image and channel, swap in a mix of another image's mean/std (statistics detached).

    x~_i = (lam sig_i + (1-lam) sig_pi(i)) (x_i - mu_i)/sig_i + (lam mu_i + (1-lam) mu_pi(i)).
    """
    b = x.shape[0]
    if lam is None:
        lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(x.device)
    if perm is None:
        perm = torch.randperm(b, generator=generator).to(x.device)
    lam = lam.to(x.dtype).view(b, 1, 1, 1)
    var, mu = torch.var_mean(x.detach(), dim=(2, 3), keepdim=True)  # one pass over x for both statistics
    sig = (var + eps).sqrt()
    x_norm = (x - mu) / sig
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return x_norm * sig_mix + mu_mix


def view_rows(batch: int, share: float) -> int:
    """How many rows of a batch of ``batch`` get a MixDistribution copy under ``view_share``: the share rounded
    up, at least 2 (NT-Xent needs a negative), at most the batch."""
    return min(batch, max(2, math.ceil(share * batch - 1e-9)))


def nt_xent_views(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sum of P NT-Xent losses in one batched computation: ``views`` is [P, 2B, D], each slice the
    embeddings of B images then of their other views (positives i <-> B + i)."""
    p, n2 = views.shape[0], views.shape[1]
    n = n2 // 2
    z = F.normalize(views.float(), dim=-1)
    sim = z @ z.transpose(1, 2) / temperature
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    target = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device).repeat(p)
    return F.cross_entropy(sim.reshape(p * n2, n2), target) * p  # the mean over P x 2B rows, times P


# ---------------------------------------------------------------- §7 baselines
def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton: KL(softmax(z_T/T) || softmax(z_S/T)) * T^2, averaged over the batch."""
    return F.kl_div(F.log_softmax(z_s.float() / T, dim=1), F.softmax(z_t.float() / T, dim=1),
                    reduction="batchmean") * T * T


def noise_adaptation_matrix(theta: torch.Tensor, acc: float) -> torch.Tensor:
    """Q[i, i] = acc; Q[i, j != i] = (1 - acc) softmax over the row's off-diagonal logits theta."""
    k = theta.shape[0]
    eye = torch.eye(k, dtype=torch.bool, device=theta.device)
    off = F.softmax(theta.float().masked_fill(eye, float("-inf")), dim=1)
    if k == 1:
        off = torch.zeros_like(off)
    return torch.where(eye, torch.full_like(off, acc), (1.0 - acc) * off)


def noisy_nll(z_s: torch.Tensor, q_matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL of the student's softmax passed through Q against the (noisy) teacher argmax."""
    p = F.softmax(z_s.float(), dim=1) @ q_matrix
    return F.nll_loss(torch.log(p.clamp_min(1e-8)), target)
