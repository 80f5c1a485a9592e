"""Classification losses for Balanced Fine-Tuning and the long-tailed baselines, one `LOSSES` dict.

A loss is a pure function whose parameters WITHOUT a default are inputs (`targets`, `class_counts`, `progress`
in [0, 1), or an entry of the model-output dict: `logits`, `features`, `cosine`) and WITH a default are its
options (`--loss.<option>`, checked against the signature by livt.config). A new loss is one function and one
`Loss` record (its family for post-hoc adjustment, its per-class tables if any) plus a method recipe.
Modules: `balanced` (bal_ce, bal_bce, gbl, lade), `reweighted` (focal, cb_*, weighted_ce, ib, seql),
`margin` (ldam, cdt), `smoothing` (label-aware), `modules` (ResLT, SADE).

The contract every loss keeps (tests/test_losses*.py): scores (B, C) in any float dtype, computed in float32
outside autocast and right in float32 against float64; `targets` hard (B,) or soft (B, C), a one-hot soft
target giving the hard label's value; schedules are functions of `progress` (the same step in a resumed run);
randomness from the global torch RNG the loop reseeds each step; re-weighting as the README's faithfulness
notes say. Biases, margins and temperatures are training devices only: evaluation uses the model's logits.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from livt.losses import balanced, margin, modules, reweighted, smoothing
from livt.losses.balanced import (
    BIAS_VARIANTS,
    bal_bce,
    bal_bce_bias,
    bal_ce,
    bce_kernel,
    ce_kernel,
    gbl,
    gbl_alpha,
    lade,
)
from livt.losses.core import Counts, cb_weights, counts64, inverse_frequency_weights, prior
from livt.losses.margin import cdt, cdt_temperatures, ldam, ldam_margins
from livt.losses.modules import reslt, sade
from livt.losses.reweighted import cb_bce, cb_ce, cb_focal, focal, ib, seql, weighted_ce
from livt.losses.smoothing import label_aware_smoothing, las_epsilons


def ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy, batch mean."""
    return ce_kernel(logits, targets)


def bce(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE with logits against one-hot/soft targets, summed over classes, batch mean (Eq. 5, w = 1)."""
    return bce_kernel(logits, targets)


SOFTMAX, SIGMOID = "softmax", "sigmoid"  # families: how a known test prior shifts the logits (metrics.posthoc_adjust)


@dataclass(frozen=True)
class Loss:
    """One registered loss, declared once: the function (its signature is the loss's inputs and options),
    its family, and, for count-based losses, `tables(class_counts, **options) -> {name: (C,) tensor}` with
    the `kernel` that applies them, so that `Criterion` computes biases / weights / margins once, validates
    every option at build time, and copies the tables to each device once. The function is the kernel
    applied to its tables."""

    fn: Callable[..., Tensor]
    family: str
    """softmax (trained through a softmax: a known test prior adds log pi_t) | sigmoid (per-class sigmoids:
    adds logit(pi_t) - logit(1/C))"""
    tables: Callable[..., dict[str, Tensor]] | None = None
    kernel: Callable[..., Tensor] | None = None

    def __post_init__(self) -> None:
        if self.family not in (SOFTMAX, SIGMOID):
            raise ValueError(f"loss {self.fn.__name__}: family must be '{SOFTMAX}' or '{SIGMOID}', got {self.family!r}")
        if (self.tables is None) != (self.kernel is None):
            raise ValueError(f"loss {self.fn.__name__}: give both tables and kernel, or neither")


LOSSES: dict[str, Loss] = {
    "ce": Loss(ce, SOFTMAX),
    "bce": Loss(bce, SIGMOID),
    "bal_ce": Loss(bal_ce, SOFTMAX, balanced._bal_ce_tables, ce_kernel),
    "bal_bce": Loss(bal_bce, SIGMOID, balanced._bal_bce_tables, bce_kernel),
    "focal": Loss(focal, SOFTMAX),
    "cb_ce": Loss(cb_ce, SOFTMAX, reweighted._cb_tables, reweighted.weighted_ce_kernel),
    "cb_focal": Loss(cb_focal, SIGMOID, reweighted._cb_tables, reweighted._sigmoid_focal_kernel),
    "cb_bce": Loss(cb_bce, SIGMOID, reweighted._cb_tables, reweighted._sigmoid_focal_kernel),
    "weighted_ce": Loss(weighted_ce, SOFTMAX, reweighted._inverse_frequency_tables, reweighted.weighted_ce_kernel),
    "ldam": Loss(ldam, SOFTMAX, margin._ldam_tables, margin._ldam_kernel),
    "lade": Loss(lade, SOFTMAX, balanced._log_prior_tables, balanced._lade_kernel),
    "ib": Loss(ib, SOFTMAX, reweighted._inverse_frequency_tables, reweighted._ib_kernel),
    "seql": Loss(seql, SOFTMAX, reweighted._seql_tables, reweighted._seql_kernel),
    "cdt": Loss(cdt, SOFTMAX, margin._cdt_tables, margin._cdt_kernel),
    "gbl": Loss(gbl, SOFTMAX, balanced._log_prior_tables, balanced._gbl_kernel),
    # MiSLAS stage 2
    "label_aware_smoothing": Loss(label_aware_smoothing, SOFTMAX, smoothing._las_tables, smoothing._las_kernel),
    # module improvements: losses on the branch / expert outputs (livt.losses.modules)
    "reslt": Loss(reslt, SOFTMAX, modules._reslt_tables, modules._reslt_kernel),
    "sade": Loss(sade, SOFTMAX, modules._sade_tables, modules._sade_kernel),
}

INPUTS = ("targets", "class_counts", "progress")  # what the loop supplies besides the model outputs


def signature(fn: Callable[..., Tensor]) -> tuple[list[str], list[str]]:
    """(inputs, options) of a loss function: its parameters without and with a default."""
    params = inspect.signature(fn).parameters.values()
    return ([p.name for p in params if p.default is inspect.Parameter.empty],
            [p.name for p in params if p.default is not inspect.Parameter.empty])


def _params(fn: Callable[..., object]) -> list[str]:
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def options(name: str) -> dict[str, tuple[type, object]]:
    """{option: (type, default)} of a registered loss that a config may set (`--loss.<option>`): its
    parameters with a default other than None, typed by the default (tuples and Literal choices by the
    annotation)."""
    fn = LOSSES[name].fn
    hints = typing.get_type_hints(fn)
    return {p.name: (hints[p.name] if isinstance(p.default, tuple) or typing.get_origin(hints.get(p.name))
                     is typing.Literal else type(p.default), p.default)
            for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty and p.default is not None}


def family(name: str) -> str:
    """'softmax' or 'sigmoid': the family of a registered loss (ValueError listing the losses otherwise)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[name].family


class Criterion:
    """`criterion(outputs, targets, progress=0.0) -> scalar` for one named loss and its options.

    `outputs` is the model-output dict (`livt.models.outputs`: logits, features, a head's extras) or a
    bare logits tensor. Per-class tensors are computed once, on the CPU, at build time, and copied to
    each device once.
    """

    def __init__(self, name: str, class_counts: Counts, **options: object) -> None:
        if name not in LOSSES:
            raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
        self.name, self.options, loss = name, options, LOSSES[name]
        self.inputs, accepted = signature(loss.fn)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"loss '{name}' takes no option {', '.join(unknown)}; "
                             f"it accepts: {', '.join(accepted) or 'none'}")
        self.needs = [i for i in self.inputs if i not in INPUTS]  # model outputs, e.g. ['logits']
        self._tables: dict[str, Tensor] = {}
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        self._counts = counts64(class_counts) if "class_counts" in self.inputs else None  # validated now
        self._kernel = loss.kernel
        if loss.tables is not None:
            defaults = {p.name: p.default for p in inspect.signature(loss.fn).parameters.values()
                        if p.default is not inspect.Parameter.empty}
            full = {**defaults, **options}
            self._tables = loss.tables(class_counts, **full)  # (C,) float32, CPU; raises now, not at step 1
            self._kernel_params = _params(loss.kernel)
            self._kernel_options = {k: v for k, v in full.items() if k in self._kernel_params}

    def _device_tables(self, device: torch.device) -> dict[str, Tensor]:
        tables = self._on_device.get(device)
        if tables is None:
            tables = self._on_device[device] = {k: t.to(device) for k, t in self._tables.items()}
        return tables

    def __call__(self, outputs: dict[str, Tensor] | Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        if isinstance(outputs, Tensor):
            outputs = {"logits": outputs}
        missing = [k for k in self.needs if k not in outputs]
        if missing:
            raise ValueError(f"loss '{self.name}' needs the model output(s) {missing}; this model gives "
                             f"{sorted(outputs)} (a loss on 'cosine' needs --model.head cosine)")
        supplied = {"targets": targets, "progress": float(progress), "class_counts": self._counts,
                    **{k: outputs[k] for k in self.needs}}
        if self._kernel is None:
            return LOSSES[self.name].fn(**{k: supplied[k] for k in self.inputs}, **self.options)
        tables = self._device_tables(outputs[self.needs[0]].device)
        kwargs = {k: supplied[k] for k in self._kernel_params if k in supplied and k != "class_counts"}
        return self._kernel(**kwargs, **tables, **self._kernel_options)


def build_loss(name: str, class_counts: Counts, **options: object) -> Criterion:
    """The `Criterion` of the named loss; `class_counts` is ignored by losses that do not take it.

    Unknown names and options the loss does not take raise ValueError listing the valid ones.
    """
    return Criterion(name, class_counts, **options)


__all__ = ["LOSSES", "Loss", "SOFTMAX", "SIGMOID", "BIAS_VARIANTS", "Criterion", "signature", "options", "family",
           "prior", "bal_bce_bias", "cb_weights", "inverse_frequency_weights", "ldam_margins", "cdt_temperatures",
           "gbl_alpha", "ce", "bce", "bal_ce", "bal_bce", "focal", "cb_ce", "cb_focal", "cb_bce", "weighted_ce", "ldam",
           "lade", "ib", "seql", "cdt", "gbl", "label_aware_smoothing", "las_epsilons", "reslt", "sade", "build_loss"]
