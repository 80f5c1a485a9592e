"""GLAG's stage 2, the Adaptive Feature Generator (Zhang et al., GLAG, Sec. 4.2, Eq. 5-11): the second stage `afg`
of `livt.stages.STAGES2`. The stage-1 head is re-trained on cached features of the frozen backbone plus Gaussian
features generated for the tail classes around calibrated means and covariances, with KD to the stage-1 head on
head classes; each tail class's confidence beta adapts to its held-out val accuracy. Where the paper gives no
rule, the readings are listed in the README's faithfulness table. Per-class covariances cost C x D x D floats.

    livt stage2 --data tiny --method glag --init_classifier <gbl run>/classifier.safetensors  (seconds)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livt import config as config_lib
from livt import engine
from livt.losses import gbl_alpha  # the Gradual Balanced Loss schedule s (c^t - 1), GLAG Eq. 3
from livt.metrics import class_accuracy
from livt.optim import build_optimizer, set_lr


def tukey(x: Tensor, lam: float) -> Tensor:
    return x.sign() * x.abs().pow(lam)


def tukey_inverse(y: Tensor, lam: float) -> Tensor:
    return y.sign() * y.abs().pow(1.0 / lam)


def class_stats(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean (C, D) (Eq. 5) and unbiased covariance (C, D, D) (Eq. 6), float64."""
    x = x.double()
    means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    covs = torch.zeros(num_classes, x.shape[1], x.shape[1], dtype=torch.float64)
    for k in range(num_classes):
        xk = x[labels == k]
        means[k] = xk.mean(0)
        if len(xk) > 1:
            d = xk - means[k]
            covs[k] = d.t() @ d / (len(xk) - 1)
    return means, covs


def support_set(x: Tensor, y: int, means: Tensor, counts: Tensor, support: int) -> tuple[Tensor, Tensor]:
    """(classes S, weights w_j = N_j / d_ij) of one transformed tail sample `x` of class `y` (Eq. 7, 10): the
    `support` classes with more samples than `y` whose means are nearest to `x`."""
    larger = torch.nonzero(counts > counts[y]).flatten()
    d = (means[larger] - x.double()).norm(dim=1)  # (L,)
    order = torch.argsort(d)[:support]
    return larger[order], counts[larger[order]].double() / d[order].clamp_min(1e-12)


def calibrate(x: Tensor, y: int, means: Tensor, covs: Tensor, counts: Tensor, beta: float, support: int,
              gamma: float) -> tuple[Tensor, Tensor]:
    """Calibrated mean (D,) (Eq. 8) and covariance (D, D) (Eq. 9) of one transformed tail sample."""
    s, w = support_set(x, y, means, counts, support)
    mu = (1 - beta) * x.double() + beta * (w[:, None] * means[s]).sum(0) / w.sum()
    cov = ((1 - beta) ** 2 * covs[y] + beta ** 2 * (w[:, None, None] * covs[s]).sum(0) / w.sum()
           + gamma * torch.eye(len(x), dtype=torch.float64))
    return mu, cov


def cov_root(cov: Tensor) -> Tensor:
    """R with R R^T = cov, for a semi-definite cov (a class of few samples), by eigendecomposition."""
    vals, vecs = torch.linalg.eigh(cov)
    return vecs * vals.clamp_min(0).sqrt()


def sample_calibrated(x: Tensor, y: int, means: Tensor, roots: Tensor, counts: Tensor, beta: float,
                      support: int, gamma: float, n: int, gen: torch.Generator) -> Tensor:
    """n draws (n, D) of N(Eq. 8 mean, Eq. 9 covariance) without forming or factorising Eq. 9 per sample:
    a sum of independent Gaussians (1 - beta) R_y z_0 + beta sum_j sqrt(w_j / sum w) R_j z_j + sqrt(gamma) z
    has exactly that covariance, and the class roots R_k are factorised once."""
    s, w = support_set(x, y, means, counts, support)
    mu = (1 - beta) * x.double() + beta * (w[:, None] * means[s]).sum(0) / w.sum()
    dim = len(x)
    z = torch.randn(len(s) + 2, n, dim, generator=gen, dtype=torch.float64)
    noise = (1 - beta) * z[0] @ roots[y].t() + math.sqrt(gamma) * z[1]
    for j, (k, wj) in enumerate(zip(s.tolist(), (w / w.sum()).tolist())):
        noise = noise + beta * math.sqrt(wj) * z[j + 2] @ roots[k].t()
    return mu + noise


def tail_classes(counts: Tensor, head_min_count: int) -> Tensor:
    """Bool (C,): classes below `head_min_count` that have a larger class to borrow from."""
    return (counts < head_min_count) & (counts < counts.max())


def generate(xt: Tensor, labels: Tensor, means: Tensor, roots: Tensor, counts: Tensor, tail: Tensor,
             beta: Tensor, support: int, gamma: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Generated transformed features and labels that top every class up to the largest count."""
    feats, ys = [], []
    n_max = int(counts.max())
    for k in range(len(counts)):
        gap = n_max - int(counts[k])
        if gap == 0:
            continue
        if not tail[k]:
            z = torch.randn(gap, xt.shape[1], generator=gen, dtype=torch.float64)
            feats.append(means[k] + z @ roots[k].t())
        else:
            own = xt[labels == k]
            share = torch.full((len(own),), gap // len(own), dtype=torch.long)
            share[: gap % len(own)] += 1  # the gap spread over the class's samples in turn
            for x, n in zip(own, share.tolist()):
                if n:
                    feats.append(sample_calibrated(x, k, means, roots, counts, float(beta[k]), support, gamma, n,
                                                   gen))
        ys.append(torch.full((gap,), k, dtype=torch.long))
    if not feats:
        return xt.new_zeros(0, xt.shape[1]), labels.new_zeros(0)
    return torch.cat(feats).float(), torch.cat(ys)


def update_beta(beta: Tensor, acc: Tensor, previous: Tensor, tail: Tensor, step: float) -> Tensor:
    """The documented rule: per tail class, + step where val accuracy rose, - step where it fell, in [0, 1]."""
    move = torch.sign(acc - previous) * step * tail
    return (beta + move).clamp(0.0, 1.0)


def afg_loss(logits: Tensor, teacher: Tensor, labels: Tensor, head: Tensor, alpha: float,
             temperature: float = 1.0) -> Tensor:
    """CE + alpha * KD (Eq. 11): KD = T^2 KL(softmax(teacher / T) || softmax(logits / T)) per sample, kept
    only for samples of head classes (`head` (C,) bool); batch means."""
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  log_target=True, reduction="none").sum(1) * temperature ** 2  # (B,)
    return ce + alpha * (kl * head[labels]).mean()


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) float64 top-1 per class; 0 for a class absent from `labels` (its beta then never moves)."""
    return class_accuracy(logits, labels, num_classes).nan_to_num(0.0)


def train_afg(head: nn.Linear, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
              cfg: config_lib.TrainClassifierConfig, *, tukey_lambda: float, support: int, gamma: float, beta: float,
              beta_step: float, head_min_count: int, kd_temperature: float, gbl_s: float, gbl_c: float,
              start: dict[str, Any] | None = None,
              save: Callable[[int, dict[str, Any]], None] | None = None) -> engine.Fitted:
    """Train `head` (a copy of the stage-1 head) on real + generated features, its learning rate and progress
    those of `engine.Plan` (one optimizer step per batch of `optim.batch_size` features). The options are
    those of the `afg` second stage (livt.stages.afg; its `tukey` is `tukey_lambda` here). `save(step, state)`
    is called after every epoch; `start`, such a state, continues from it (exactly)."""
    num_classes = head.out_features
    if not 0 < tukey_lambda <= 1 or support < 1:
        raise config_lib.ConfigError(
            f"--decoupled.tukey must be in (0, 1] and --decoupled.support >= 1, got {tukey_lambda}, {support}")
    teacher = nn.Linear(head.in_features, num_classes)
    teacher.load_state_dict(head.state_dict())
    teacher.requires_grad_(False)
    counts = torch.bincount(train_y, minlength=num_classes)
    tail = tail_classes(counts, head_min_count)
    is_head = ~tail
    xt = tukey(train_x.double(), tukey_lambda)
    means, covs = class_stats(xt, train_y, num_classes)
    roots = torch.stack([cov_root(c) for c in covs])  # (C, D, D)
    betas = tail.double() * beta
    gen = torch.Generator().manual_seed(engine.derive_seed(cfg.seed, 12))
    optimizer = build_optimizer(head, cfg.optim, 0.0)
    n_fake = int((counts.max() - counts).sum())
    plan = engine.Plan.make(cfg.optim, cfg.optim.batch_size, 1,
                            math.ceil((len(train_y) + n_fake) / cfg.optim.batch_size))
    with torch.no_grad():
        previous = per_class_accuracy(head(val_x), val_y, num_classes)
    rows: list[dict[str, Any]] = []
    first = 0
    if start is not None:
        head.load_state_dict(start["head"])
        optimizer.load_state_dict(start["optimizer"])
        gen.set_state(start["generator"])
        betas, previous, rows, first = start["betas"], start["previous"], start["rows"], start["epoch"]
    step = first * plan.steps_per_epoch
    for epoch in range(first, cfg.optim.epochs):
        t0 = time.perf_counter()
        fake_t, fake_y = generate(xt, train_y, means, roots, counts, tail, betas, support, gamma, gen)
        x = torch.cat([train_x, tukey_inverse(fake_t.double(), tukey_lambda).float()])
        y = torch.cat([train_y, fake_y])
        order = torch.randperm(len(y), generator=gen)
        losses = []
        for i in range(0, len(y), plan.micro_batch):
            idx = order[i:i + plan.micro_batch]
            set_lr(optimizer, plan.lr_at(step, cfg.optim))
            alpha = gbl_alpha(plan.progress(step), gbl_s, gbl_c)
            loss = afg_loss(head(x[idx]), teacher(x[idx]), y[idx], is_head, alpha, kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
        with torch.no_grad():
            acc = per_class_accuracy(head(val_x), val_y, num_classes)
        betas = update_beta(betas, acc, previous, tail, beta_step)
        previous = acc
        present = torch.bincount(val_y, minlength=num_classes) > 0
        rows.append({"epoch": epoch + 1, "loss": float(np.mean([v.item() for v in losses])),
                     "generated": len(fake_y), "val_mean_class_acc": float(acc[present].mean() * 100),
                     "tail_beta_mean": float(betas[tail].mean()) if tail.any() else None,
                     "seconds": round(time.perf_counter() - t0, 2)})
        if save is not None:
            save(step, {"epoch": epoch + 1, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": gen.get_state(), "betas": betas, "previous": previous, "rows": rows})
    selection = {"rule": "last (val adapts beta only)", "epoch": cfg.optim.epochs,
                 "tail_beta": [round(b, 4) for b in betas.tolist()]}
    return engine.Fitted(head, selection, rows, {"epochs": cfg.optim.epochs, "steps": step,
                                                 "images_seen": len(train_x) + len(val_x)})
