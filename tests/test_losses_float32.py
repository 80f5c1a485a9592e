"""Every registered loss is right in float32, the precision losses are computed in: on extreme inputs its
value and its gradient match the same loss computed in float64 on the same (float32-representable) inputs.

The losses come from the registry (`livt.losses.LOSSES`), so a new loss joins by being registered. What a
loss needs is read from its signature (`livt.losses.signature`): the model outputs it takes (logits,
cosine, features, branch / expert logits), class counts, training progress; per-class tables and options
come from `build_loss`, as in training. A loss that needs an input this file cannot make fails the test.

Tolerance (float32 epsilon 1.19e-7): the loss within RTOL = 1e-5 (~80 ulps) of the float64 value, plus an
absolute slack of ATOL = 1e-6 times the scale of the terms it is made of (a loss that is a small difference
of large terms cannot be closer in any float32 form); each gradient entry within RTOL relative plus
ATOL times the largest gradient entry of that input over all cases (PyTorch's own CE backward, softmax
minus one-hot, is exact only to an ulp of 1, so entries near 0 cannot be relatively exact).
"""

import pytest
import torch

from livt.losses import INPUTS, LOSSES, build_loss, signature

RTOL, ATOL = 1e-5, 1e-6
B, D, K = 8, 6, 3  # batch, feature width, branches / experts

PROFILES = {  # training counts per class
    "cifar10_lt_x100": [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    "cifar100_lt_x100": [int(500 * 0.01 ** (i / 99)) for i in range(100)],
    "two_classes_x5000": [5000, 1],
    "step_x1000": [1000] * 4 + [1] * 4,
}
PROGRESS = (0.0, 0.95)  # before and after every schedule's switch (DRW 0.8, IB 0.5, GBL's alpha grows)


def scenario_logits(name: str, counts: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C) within [-30, 30], hard labels (B,)) of one extreme case."""
    c = len(counts)
    order = sorted(range(c), key=lambda k: -counts[k])
    head, tail = order[0], order[-1]
    rand = lambda: torch.rand(B, c, generator=gen)  # noqa: E731
    labels = torch.randint(0, c, (B,), generator=gen)
    if name == "confident_right":  # half head, half tail samples, all predicted right with logit +30
        labels = torch.tensor([head, tail] * (B // 2))
        z = -30 + 5 * rand()
        z[torch.arange(B), labels] = 30.0
    elif name == "confident_tail_others_zero":  # the LDAM case: cos_y 0.7 ... 1, others 0
        labels = torch.full((B,), tail)
        z = torch.zeros(B, c)
        z[:, tail] = torch.linspace(21.0, 30.0, B)
    elif name == "confident_wrong":  # label logit -30, another class +30
        z = 10 * rand() - 5
        z[torch.arange(B), labels] = -30.0
        z[torch.arange(B), (labels + 1) % c] = 30.0
    elif name == "one_class_present_tail":  # every class absent from the batch but the rarest
        labels = torch.full((B,), tail)
        z = 60 * rand() - 30
    elif name == "one_class_present_head":
        labels = torch.full((B,), head)
        z = 60 * rand() - 30
    elif name == "saturated":  # every logit at +-30
        z = torch.where(rand() < 0.5, -30.0, 30.0)
    elif name == "near_zero":
        z = 1e-3 * (2 * rand() - 1)
    else:
        raise AssertionError(name)
    return z, labels


SCENARIOS = ("confident_right", "confident_tail_others_zero", "confident_wrong", "one_class_present_tail",
             "one_class_present_head", "saturated", "near_zero")


def soft_targets(labels: torch.Tensor, c: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """float32 (B, C) targets: 'smoothed' (label smoothing 0.1, timm's form) or 'mixup' (0.7 / 0.3 of two
    labels, then smoothed)."""
    eye = torch.eye(c)
    t = eye[labels]
    if kind == "mixup":
        t = 0.7 * t + 0.3 * eye[labels[torch.randperm(B, generator=gen)]]
    return t * 0.9 + 0.1 / c


def model_outputs(needs: list[str], z: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 model outputs of the kinds a loss takes, built from one case's logits `z` (B, C)."""
    out = {}
    for kind in needs:
        if kind == "logits":
            out[kind] = z.clone()
        elif kind == "cosine":  # s cos within +-30 for the default s = 30
            out[kind] = (z / 30).clamp(-1, 1)
        elif kind == "features":  # the classifier's input: large and small norms
            out[kind] = torch.randn(B, D, generator=gen) * torch.logspace(-2, 2, B)[:, None]
        elif kind in ("branch_logits", "expert_logits"):  # K sets of logits: the case, flipped, damped
            out[kind] = torch.stack([z, -z, 0.3 * z + torch.randn(z.shape, generator=gen)])[:K]
        else:
            pytest.fail(f"no float32 test input for the model output '{kind}': add it to model_outputs")
    return out


def evaluate(criterion, outputs: dict[str, torch.Tensor], targets: torch.Tensor, progress: float,
             dtype: torch.dtype):
    outs = {k: v.to(dtype).requires_grad_(True) for k, v in outputs.items()}
    torch.manual_seed(0)  # the same draw for losses with randomness (SEQL)
    loss = criterion(outs, targets.to(dtype) if targets.is_floating_point() else targets, progress)
    grads = torch.autograd.grad(loss, list(outs.values()), allow_unused=True)  # IB ignores features at first
    return loss, {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(outs.items(), grads)}


def term_scale(outputs: dict[str, torch.Tensor], loss64: torch.Tensor) -> float:
    """Scale of the terms a loss sums: |loss| or the largest input magnitude (a logit, a log-partition)."""
    return max(1.0, abs(loss64.item()), *(v.abs().max().item() for v in outputs.values()))


def cases(name: str):
    """(where, outputs, float32 loss, float64 loss, float32 grads, float64 grads) of every case of a loss."""
    inputs, _ = signature(LOSSES[name].fn)
    needs = [i for i in inputs if i not in INPUTS]
    assert needs, f"loss '{name}' takes no model output"
    progresses = PROGRESS if "progress" in inputs else (0.0,)
    gen = torch.Generator().manual_seed(0)
    for profile, counts in PROFILES.items():
        criterion = build_loss(name, counts)
        for scenario in SCENARIOS:
            z, labels = scenario_logits(scenario, counts, gen)
            outputs = model_outputs(needs, z, gen)
            for target_kind in ("hard", "smoothed", "mixup"):
                targets = labels if target_kind == "hard" else soft_targets(labels, len(counts), target_kind, gen)
                for progress in progresses:
                    yield (f"{name} {profile} {scenario} {target_kind} progress {progress}", outputs,
                           *evaluate(criterion, outputs, targets, progress, torch.float32),
                           *evaluate(criterion, outputs, targets, progress, torch.float64))


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_registered_loss_is_right_in_float32(name):
    results = list(cases(name))
    inputs, _ = signature(LOSSES[name].fn)
    assert len(results) == len(PROFILES) * len(SCENARIOS) * 3 * (len(PROGRESS) if "progress" in inputs else 1)
    # the gradient scale of each input: its largest float64 gradient entry over all cases
    scale = {k: max(r[5][k].abs().max().item() for r in results) for k in results[0][5]}
    assert all(v > 0 for v in scale.values()), scale
    for where, outputs, loss32, grads32, loss64, grads64 in results:
        assert loss32.dtype == torch.float32 and loss64.dtype == torch.float64, where
        assert torch.isfinite(loss64), where
        error = abs(loss32.item() - loss64.item())
        allowed = RTOL * abs(loss64.item()) + ATOL * term_scale(outputs, loss64)
        assert error <= allowed, f"{where}: loss float32 {loss32.item()!r}, float64 {loss64.item()!r}"
        for key, g64 in grads64.items():
            bound = RTOL * g64.abs() + ATOL * scale[key]
            off = (grads32[key].double() - g64).abs()
            worst = int(torch.argmax(off / bound))
            assert torch.all(off <= bound), (f"{where}: gradient w.r.t. {key}, entry {worst}: float32 "
                                             f"{grads32[key].flatten()[worst].item()!r}, float64 "
                                             f"{g64.flatten()[worst].item()!r}")
