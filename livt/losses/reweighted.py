"""Re-weighting: focal, class-balanced (effective number) in CE / focal / BCE form, weighted softmax,
influence-balanced loss, and the softmax equalisation loss (which re-weights the denominator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import (
    Counts,
    cb_weights,
    check,
    float32,
    inverse_frequency_weights,
    lse_without,
    per_sample,
    prior64,
    probs,
    soft_ce,
    weighted_mean,
)


def _cb_tables(class_counts: Counts, beta: float = 0.9999, gamma: float = 0.0) -> dict[str, Tensor]:
    check("gamma", gamma, gamma >= 0, ">= 0")
    return {"weight": cb_weights(class_counts, beta)}


def _inverse_frequency_tables(class_counts: Counts, **options: float) -> dict[str, Tensor]:
    for name, value in options.items():  # IB's alpha and eps (> 0) and start (>= 0)
        positive = name in ("alpha", "eps")
        check(name, value, value > 0 if positive else value >= 0, "> 0" if positive else ">= 0")
    return {"weight": inverse_frequency_weights(class_counts)}


def _seql_tables(class_counts: Counts, gamma: float = 0.9, threshold: float = 1e-3) -> dict[str, Tensor]:
    check("gamma", gamma, 0 <= gamma <= 1, "a probability in [0, 1]")
    check("threshold", threshold, 0 <= threshold <= 1, "a frequency in [0, 1]")
    return {"rare": (prior64(class_counts) < threshold).float()}  # T_lambda(f_k)


@float32
def weighted_ce_kernel(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    return weighted_mean(soft_ce(logits, targets), weight, targets)


@float32
def _focal_kernel(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    log_p = F.log_softmax(logits, dim=-1)  # (B, C)
    t = probs(targets, logits.shape[1], logits.dtype)
    return -(t * (1.0 - log_p.exp()).pow(gamma) * log_p).sum(-1).mean()


@float32
def _sigmoid_focal_kernel(logits: Tensor, targets: Tensor, weight: Tensor, gamma: float = 0.0) -> Tensor:
    # Per class: t (1 - p)^gamma (-log p) + (1 - t) p^gamma (-log(1 - p)), p = sigmoid(z); linear in t,
    # so a soft target is the target-weighted mix of the positive and negative terms. gamma = 0: BCE.
    t = probs(targets, logits.shape[1], logits.dtype)
    p = torch.sigmoid(logits)
    per_class = (-t * (1 - p).pow(gamma) * F.logsigmoid(logits)
                 - (1 - t) * p.pow(gamma) * F.logsigmoid(-logits))  # (B, C)
    return weighted_mean(per_class.sum(-1), weight, targets)


@float32
def _ib_kernel(logits: Tensor, targets: Tensor, features: Tensor, progress: float, weight: Tensor,
               alpha: float, start: float, eps: float) -> Tensor:
    if targets.is_floating_point():
        ce = soft_ce(logits, targets)  # (B,)
        # ||softmax(z) - t||_1; at the argmax, where p_c may be near 1, |(1 - t_c) - (1 - p_c)| with
        # 1 - p_c = e^{lse_{-c} - lse} (exact, and so is its gradient: IB's weight amplifies it by alpha / eps)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), True)
        one_minus_p = (lse_without(logits) - lse).exp()
        p = (logits - lse).exp()
        grad_norm = torch.where(is_top, (1 - targets) - one_minus_p, p - targets).abs().sum(-1)  # (B,)
    else:
        # d = log sum_{k != y} e^{z_k} - z_y: CE = softplus(d) and ||softmax(z) - e_y||_1 = 2 (1 - p_y)
        # = 2 sigmoid(d), exact for a confident sample, where 1 - p_y cancels in float32 (IB divides by it)
        rest = torch.logsumexp(logits.scatter(1, targets[:, None], float("-inf")), -1)
        d = rest - logits.gather(1, targets[:, None])[:, 0]
        ce, grad_norm = F.softplus(d), 2 * torch.sigmoid(d)
    if progress < start:
        return ce.mean()  # plain CE first (the IB weights need a reasonably trained model)
    influence = grad_norm * features.abs().sum(-1)  # times ||h||_1 of the classifier's input
    return weighted_mean(alpha / (influence + eps) * ce, weight, targets)


@float32
def _seql_kernel(logits: Tensor, targets: Tensor, rare: Tensor, gamma: float) -> Tensor:
    # beta ~ Bernoulli(gamma) per (sample, class), from the global RNG that the loop reseeds every step
    beta = (torch.rand(logits.shape, device=logits.device, dtype=torch.float32) < gamma).to(logits.dtype)
    keep = 1.0 - beta * rare  # (B, C): w_k with y_k = 0; the label's own class is always kept
    shift = logits.detach().amax(-1, keepdim=True)
    e = (logits - shift).exp()
    kept = (keep * e).sum(-1, keepdim=True)  # (B, 1)
    # loss were the label c: log(sum_k keep_k e^{z_k} + (1 - keep_c) e^{z_c}) - z_c, (B, C)
    per_class = torch.log(kept + (1.0 - keep) * e) + shift - logits
    return per_sample(per_class, targets).mean()


# ---------------------------------------------------------------------------------------------
# Public losses


def focal(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Softmax focal loss -sum_c t_c (1 - p_c)^gamma log p_c, batch mean; gamma = 0 is CE."""
    check("gamma", gamma, gamma >= 0, ">= 0")
    return _focal_kernel(logits, targets, gamma=float(gamma))


def cb_ce(logits: Tensor, targets: Tensor, class_counts: Counts, beta: float = 0.9999) -> Tensor:
    """Class-balanced CE: per-sample weight w_y (soft: sum_c t_c w_c) from `cb_weights`, batch mean."""
    return weighted_ce_kernel(logits, targets, **_cb_tables(class_counts, beta))


def cb_focal(logits: Tensor, targets: Tensor, class_counts: Counts, beta: float = 0.9999,
             gamma: float = 1.0) -> Tensor:
    """Class-balanced focal loss (Cui et al. 2019, sigmoid form as in the paper): w_y * sum_c of the
    sigmoid focal term of class c, batch mean; beta = 0 is the plain sigmoid focal loss."""
    return _sigmoid_focal_kernel(logits, targets, **_cb_tables(class_counts, beta, gamma), gamma=float(gamma))


def cb_bce(logits: Tensor, targets: Tensor, class_counts: Counts, beta: float = 0.9999) -> Tensor:
    """Class-balanced sigmoid CE (Cui et al. 2019): w_y * sum_c BCE(z_c, t_c), batch mean; beta = 0 is bce."""
    return _sigmoid_focal_kernel(logits, targets, **_cb_tables(class_counts, beta), gamma=0.0)


def weighted_ce(logits: Tensor, targets: Tensor, class_counts: Counts) -> Tensor:
    """Weighted softmax: CE with per-sample weight w_y = 1 / pi_y normalised to sum C (survey Table 3)."""
    return weighted_ce_kernel(logits, targets, **_inverse_frequency_tables(class_counts))


def ib(logits: Tensor, targets: Tensor, features: Tensor, class_counts: Counts, progress: float,
       alpha: float = 1000.0, start: float = 0.5, eps: float = 1e-3) -> Tensor:
    """Influence-balanced loss (Park et al., ICCV 2021): plain CE until `start` (a fraction of training),
    then lambda_y * alpha * CE / (||softmax(z) - y||_1 ||h||_1 + eps), h = the `features` output,
    lambda_c = 1 / n_c normalised to sum C. The influence term is not detached (as in the paper's
    loss and the official code)."""
    return _ib_kernel(logits, targets, features, progress,
                      **_inverse_frequency_tables(class_counts, alpha=alpha, start=start, eps=eps),
                      alpha=alpha, start=start, eps=eps)


def seql(logits: Tensor, targets: Tensor, class_counts: Counts, gamma: float = 0.9,
         threshold: float = 1e-3) -> Tensor:
    """Softmax equalisation loss (Tan et al., CVPR 2020): -log(e^{z_y} / sum_k w_k e^{z_k}) with
    w_k = 1 - beta T(f_k) (1 - y_k): each negative class whose training frequency f_k = n_k / N is below
    `threshold` leaves the denominator with probability `gamma` (one draw per sample and class).
    Soft targets: sum_c t_c times the loss were the label c, with the same draw."""
    return _seql_kernel(logits, targets, **_seql_tables(class_counts, gamma, threshold), gamma=float(gamma))
