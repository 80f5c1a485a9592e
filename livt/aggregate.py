"""SADE's test-time self-supervised aggregation (Zhang et al., NeurIPS 2022): the experts' weights
w = softmax(theta) are learned on UNLABELLED test images by maximising the agreement (cosine similarity)
of the predictions softmax(sum_e w_e z_e) of two augmented views of each image. The prediction is then
sum_e w_e z_e on the plain (evaluation-transform) image.

Labels are never read while the weights are learned, but the test images are: results made this way are
transductive and are reported as such, beside (never instead of) the inductive ones.
`--tta_aggregate` adds them: test_results.json key "transductive" (metrics and weights) and, with
`--test_prior_imbalance`, one row per shifted test set (weights learned on that set) in
test_prior_results.json.

Views: the run's training augmentation, two fresh draws per image per pass. The model is frozen (eval
mode): only theta learns, so each pass's expert logits are computed once and the weights are fitted on
them (SGD, momentum 0.9, theta = 0 at the start, i.e. equal weights).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livt import engine
from livt.data.loading import Augmented
from livt.data.transforms import eval_transform, finetune_transform
from livt.metrics import evaluate_logits, long_tailed_test_prior, subsample_to_prior
from livt.models import Adapter
from livt.models.sade import SADEClassifier

ROW_KEYS = ("n", "top1", "many", "medium", "few", "ece")


class Aggregator:
    """Expert weights softmax(theta) fitted by SGD on -cos(p(view 1), p(view 2)), pass by pass."""

    def __init__(self, num_experts: int = 3, lr: float = 0.025, batch_size: int = 128, seed: int = 0) -> None:
        if lr <= 0 or batch_size < 1:
            raise ValueError(f"test-time aggregation needs lr > 0 and batch_size >= 1, got {lr}, {batch_size}")
        self.theta = torch.zeros(num_experts, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.theta], lr=lr, momentum=0.9)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def weights(self) -> Tensor:
        """(E,) expert weights, a distribution."""
        return torch.softmax(self.theta.detach(), 0)

    def fit_pass(self, view1: Tensor, view2: Tensor) -> None:
        """One pass over the expert logits (N, E, C) of two views of the same N images, shuffled."""
        if view1.shape != view2.shape or view1.dim() != 3:
            raise ValueError(f"views must be two (N, experts, C) tensors of one shape, got "
                             f"{tuple(view1.shape)} and {tuple(view2.shape)}")
        order = torch.randperm(len(view1), generator=self.generator)
        for idx in order.split(self.batch_size):
            w = torch.softmax(self.theta, 0)
            p1 = torch.softmax(torch.einsum("e,bec->bc", w, view1[idx].float()), -1)
            p2 = torch.softmax(torch.einsum("e,bec->bc", w, view2[idx].float()), -1)
            loss = -F.cosine_similarity(p1, p2, dim=-1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def combine(expert_logits: Tensor, weights: Tensor) -> Tensor:
    """sum_e w_e z_e: (N, E, C), (E,) -> (N, C)."""
    return torch.einsum("e,nec->nc", weights.to(expert_logits), expert_logits)


def expert_logits(model: nn.Module, x: Tensor) -> Tensor:
    """(B, E, C) expert logits of a multi-expert model, for `engine.predict` (through `livt.models.Adapter`)."""
    return model.forward_outputs(x)["expert_logits"].transpose(0, 1)


def multi_expert(accelerator, model: nn.Module) -> SADEClassifier:
    """The multi-expert model inside `model` (Accelerate's wrappers, livt.models.Adapter)."""
    inner = accelerator.unwrap_model(model)
    inner = getattr(inner, "model", inner)  # Adapter
    if not isinstance(inner, SADEClassifier):
        raise ValueError(f"--tta_aggregate needs a multi-expert model (--model.head sade); this one is a "
                         f"{type(inner).__name__}")
    return inner


def transductive(accelerator, model: nn.Module, cfg, dataset, counts: np.ndarray,
                 shifted_imbalance: float = 0.0) -> tuple[dict, list[dict]]:
    """(metrics of the balanced `dataset` with weights learned on its unlabelled images, the rows of the
    forward / backward long-tailed subsets of `shifted_imbalance`, each with weights learned on itself)."""
    d = cfg.data
    net = Adapter(multi_expert(accelerator, model), expert_logits)

    def logits_of(transform, seed: int) -> tuple[Tensor, Tensor]:
        data = Augmented(dataset, transform, seed, d.skip_bad_images)
        return engine.predict(accelerator, net, data, d.batch_size, d.num_workers)  # (N, E, C), (N,)

    clean, labels = logits_of(eval_transform(d.img_size, d.mean, d.std, d.eval_crop), cfg.seed)
    subsets: dict[str, Tensor | None] = {"test": None}
    if shifted_imbalance:
        for direction, reverse in (("forward", False), ("backward", True)):
            prior = long_tailed_test_prior(len(counts), shifted_imbalance, reverse=reverse)
            subsets[f"{direction} x{shifted_imbalance:g}"] = torch.as_tensor(
                subsample_to_prior(labels.numpy(), prior, cfg.seed))  # the subsets finetune reports
    fitters = {name: Aggregator(clean.shape[1], cfg.tta_lr, d.batch_size, cfg.seed) for name in subsets}
    augment = finetune_transform(d.img_size, d.mean, d.std, cfg.aug.rand_augment, cfg.aug.reprob,
                                 cfg.aug.color_jitter, cfg.aug.crop_scale)
    for p in range(cfg.tta_epochs):
        view1, _ = logits_of(augment, engine.derive_seed(cfg.seed, p, 1))
        view2, _ = logits_of(augment, engine.derive_seed(cfg.seed, p, 2))
        for name, idx in subsets.items():
            fitters[name].fit_pass(view1 if idx is None else view1[idx], view2 if idx is None else view2[idx])

    results, rows = {}, []
    for name, idx in subsets.items():
        w = fitters[name].weights
        z, y = (clean, labels) if idx is None else (clean[idx], labels[idx])
        r = evaluate_logits(combine(z, w), y, counts)
        weights = [round(float(v), 4) for v in w]
        if idx is None:
            results = {"protocol": "SADE test-time aggregation on the unlabelled test images (transductive)",
                       **{k: r[k] for k in ("n", "top1", "top5", "many", "medium", "few", "ece", "mce")},
                       "weights": weights}
        else:
            rows.append({"test set": name, "post-hoc": "no", "transductive": "yes",
                         **{k: r[k] for k in ROW_KEYS}, "weights": weights})
    return results, rows


__all__ = ["Aggregator", "combine", "transductive"]
