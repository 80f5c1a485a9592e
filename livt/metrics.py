"""Evaluation metrics: top-1/top-5, shot-group accuracy, calibration, post-hoc prior adjustment.

Conventions: accuracies, ECE and MCE are percentages; shot groups use the TRAINING counts
(`livt.data.stats.shot_groups`: many > 100, medium 20-100, few < 20); a group that is empty, or whose
classes are all absent from the test set, is None (printed "n/a", written null), never 0.
Predictions and confidences use the raw logits: the Bal-CE / Bal-BCE biases are training-only.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from livt import losses
from livt.data.stats import shot_groups

ArrayLike = Tensor | np.ndarray | Sequence
# Post-hoc logit adjustment: the fixed grid tau is swept over on a held-out val split.
POSTHOC_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0


def _logits(x: ArrayLike) -> Tensor:
    """(N, C) float32 CPU logits; probabilities (entries in [0, 1], rows summing to 1) become log p."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() != 2:
        raise ValueError(f"expected logits or probabilities of shape (N, C), got {tuple(x.shape)}")
    is_prob = bool(((x >= 0) & (x <= 1)).all()) and torch.allclose(x.sum(1), torch.ones(len(x)), atol=1e-3)
    return x.log() if is_prob else x  # softmax(log p) = p, so both paths share one code path


def _labels(labels: ArrayLike, n: int, num_classes: int) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu().long()
    if y.shape != (n,):
        raise ValueError(f"labels must be ({n},) to match the logits, got {tuple(y.shape)}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), "
                         f"got range [{y.min().item()}, {y.max().item()}]")
    return y


def reliability_bins(logits_or_probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict:
    """Calibration per confidence bin: `n_bins` equal-width bins on (0, 1], confidence = max softmax prob.

    Returns counts (n_bins,) int64, accuracy and confidence (n_bins,) as fractions (NaN for empty
    bins), and ece / mce in percent: ECE = count-weighted mean |acc - conf| over non-empty bins, MCE =
    the largest gap.
    """
    z = _logits(logits_or_probs)
    y = _labels(labels, len(z), z.shape[1])
    top, pred = z.max(dim=1)  # (N,), (N,)
    conf = torch.exp(top - torch.logsumexp(z, dim=1))  # max softmax probability, without an (N, C) copy
    edges = torch.linspace(0, 1, n_bins + 1)
    # Bin b holds (edges[b], edges[b + 1]]: the first edge >= conf closes it.
    idx = (torch.searchsorted(edges, conf, right=False) - 1).clamp(0, n_bins - 1).numpy()
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, (pred == y).double().numpy(), minlength=n_bins) / counts
        mean_conf = np.bincount(idx, conf.double().numpy(), minlength=n_bins) / counts
    gap = np.abs(acc - mean_conf)[counts > 0]
    total = counts.sum()
    return {
        "counts": counts,
        "accuracy": acc,
        "confidence": mean_conf,
        "ece": float((gap * counts[counts > 0]).sum() / total * 100) if total else math.nan,
        "mce": float(gap.max() * 100) if total else math.nan,
    }


def ece_mce(logits_or_probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> tuple[float, float]:
    """(ECE, MCE) in PERCENT, from (N, C) logits or probabilities (see `reliability_bins`)."""
    bins = reliability_bins(logits_or_probs, labels, n_bins)
    return bins["ece"], bins["mce"]


def class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) float64 top-1 of each class as a fraction (first maximum on ties); NaN for a class absent from
    `labels`."""
    n = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, (logits.argmax(1) == labels).double(), minlength=num_classes)
    return hits / n


def _group_mean(per_class: np.ndarray, classes: np.ndarray) -> float | None:
    acc = per_class[classes]
    acc = acc[~np.isnan(acc)]
    return float(acc.mean()) if len(acc) else None


def evaluate_logits(logits: ArrayLike, labels: ArrayLike, train_counts: ArrayLike,
                    class_names: Sequence[str] | None = None) -> dict:
    """All test metrics from raw (N, C) logits; accuracies in percent.

    Keys: n, top1, top5 (k = min(5, C)), many / medium / few (mean per-class accuracy of the shot group
    by training count, None when empty), ece, mce (percent), nll (mean, nats), per_class (C,) float
    (NaN for classes absent from the test set), test_counts (C,) int64, confusion (C, C) int64 (rows =
    true label, columns = prediction), reliability (see `reliability_bins`), class_names (list;
    "0", "1", ... when not given).
    """
    z = _logits(logits)
    n, num_classes = z.shape
    y = _labels(labels, n, num_classes)
    train_counts = np.asarray(train_counts)
    if train_counts.shape != (num_classes,):
        raise ValueError(f"train_counts has shape {train_counts.shape}, logits have {num_classes} classes")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    topk = z.topk(min(5, num_classes), dim=1).indices  # (N, k)
    pred = z.argmax(dim=1)  # first maximum on ties, as in `reliability_bins`
    correct = (pred == y).numpy()
    y_np = y.numpy()
    test_counts = np.bincount(y_np, minlength=num_classes).astype(np.int64)
    per_class = class_accuracy(z, y, num_classes).numpy() * 100
    confusion = np.bincount(y_np * num_classes + pred.numpy(), minlength=num_classes**2)
    groups = shot_groups(train_counts)
    bins = reliability_bins(z, y)
    nll = (torch.logsumexp(z, dim=1) - z.gather(1, y[:, None])[:, 0]).double().mean()  # (N,) -> scalar
    return {
        "n": int(n),
        "top1": float(correct.mean() * 100) if n else math.nan,
        "top5": float((topk == y[:, None]).any(1).double().mean() * 100) if n else math.nan,
        **{g: _group_mean(per_class, groups[g]) for g in ("many", "medium", "few")},
        "ece": bins["ece"],
        "mce": bins["mce"],
        "nll": float(nll),
        "per_class": per_class,
        "test_counts": test_counts,
        "confusion": confusion.reshape(num_classes, num_classes).astype(np.int64),
        "reliability": bins,
        "class_names": list(class_names) if class_names is not None else [str(c) for c in range(num_classes)],
    }


# ---------------------------------------------------------------------------------------------
# Known test priors (test-agnostic evaluation)


def posthoc_adjust(logits: Tensor, train_counts: ArrayLike, test_prior: ArrayLike,
                   trained_with: str) -> Tensor:
    """Shift logits of a model trained for a BALANCED test set to a known test prior pi_t.

    `trained_with` names a loss of `livt.losses.LOSSES`; its family decides the shift. Sigmoid family (bce,
    bal_bce, cb_bce, cb_focal): z + [log pi_t - log(1 - pi_t)] - [log(1/C) - log(1 - 1/C)]; softmax family
    (ce, bal_ce, focal, ..., reslt, sade): z + log pi_t. `test_prior` may be counts or probabilities.
    `train_counts` only fixes C (the formulas use the uniform prior the model was balanced for).
    """
    sigmoid = losses.family(trained_with) == losses.SIGMOID  # ValueError naming the losses for an unknown one
    num_classes = len(np.asarray(train_counts))
    pi_t = torch.as_tensor(np.asarray(test_prior, dtype=np.float64))
    if pi_t.shape != (num_classes,) or logits.shape[-1] != num_classes:
        raise ValueError(f"test_prior {tuple(pi_t.shape)}, train_counts ({num_classes},) and logits "
                         f"{tuple(logits.shape)} must agree on the number of classes")
    if (pi_t <= 0).any():
        raise ValueError(f"test_prior: class {torch.nonzero(pi_t <= 0)[0].item()} has no mass (log 0)")
    pi_t = pi_t / pi_t.sum()
    if sigmoid:
        uniform = 1.0 / num_classes
        shift = torch.log(pi_t) - torch.log1p(-pi_t) - (math.log(uniform) - math.log1p(-uniform))
    else:
        shift = torch.log(pi_t)
    return logits + shift.to(device=logits.device, dtype=logits.dtype)


def logit_adjust(logits: Tensor, train_counts: ArrayLike, tau: float) -> Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021) for a balanced test set: z - tau * log pi_train.
    tau = 0 is the identity."""
    log_prior = torch.log(torch.as_tensor(np.asarray(train_counts, dtype=np.float64)))
    log_prior = log_prior - torch.logsumexp(log_prior, 0)  # log pi = log n - log N
    return logits - (tau * log_prior).to(device=logits.device, dtype=logits.dtype)


def choose_posthoc_tau(logits: Tensor, labels: ArrayLike, train_counts: ArrayLike,
                       taus: Sequence[float] = POSTHOC_TAUS) -> float:
    """The tau of `taus` whose adjusted logits have the best top-1 on these (held-out val) logits;
    the first, i.e. the smallest, on ties. Never call it with test logits."""
    y = torch.as_tensor(labels).long().cpu()
    z = _logits(logits)
    acc = [float((logit_adjust(z, train_counts, t).argmax(1) == y).double().mean()) for t in taus]
    return float(taus[int(np.argmax(acc))])


def long_tailed_test_prior(num_classes: int, imbalance: float, reverse: bool = False) -> np.ndarray:
    """Test prior (C,) float64 following the training profile n_i ∝ (1/imbalance)^(i/(C-1)).

    Forward (class 0 largest) or, with `reverse`, backward long-tailed; imbalance 1 is uniform.
    """
    if num_classes < 2 or imbalance < 1:
        raise ValueError(f"need num_classes >= 2 and imbalance >= 1, got {num_classes}, {imbalance}")
    profile = (1.0 / imbalance) ** (np.arange(num_classes) / (num_classes - 1))
    if reverse:
        profile = profile[::-1]
    return profile / profile.sum()


def subsample_to_prior(labels: ArrayLike, prior: ArrayLike, seed: int) -> np.ndarray:
    """Sorted indices of a subset of `labels` whose class sizes follow `prior`.

    Class c keeps floor(m * prior_c / max(prior)) images, m = the smallest class size available,
    drawn without replacement with a generator seeded by `seed`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    prior = np.asarray(prior, dtype=np.float64)
    available = np.bincount(labels, minlength=len(prior))
    if len(available) != len(prior):
        raise ValueError(f"labels reach class {len(available) - 1} but the prior has {len(prior)} classes")
    keep = np.floor(available.min() * prior / prior.max() + 1e-9).astype(np.int64)  # 1e-9: 2.0 not 1.999
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in enumerate(keep)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Atomic writes (of the results files and figures, livt.report / livt.figures)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the folder of `path`; on success it replaces `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["reliability_bins", "ece_mce", "evaluate_logits", "posthoc_adjust", "logit_adjust", "choose_posthoc_tau",
           "POSTHOC_TAUS", "long_tailed_test_prior", "subsample_to_prior", "atomic_path"]
