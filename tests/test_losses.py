"""Losses against hand-computed values. Class counts [6, 3, 1]: N = 10, pi = (.6, .3, .1), C = 3."""

import math

import pytest
import torch

from livt.losses import (
    bal_bce,
    bal_bce_bias,
    bal_ce,
    bce,
    build_loss,
    cb_ce,
    cb_weights,
    ce,
    focal,
    prior,
)

COUNTS = [6, 3, 1]
# Eq. 10: log(pi / (1 - pi)) + log(C - 1) = log(2 pi / (1 - pi))
EQ10 = [math.log(3.0), math.log(6 / 7), math.log(2 / 9)]  # 1.0986123, -0.1541507, -1.5040774
# Eq. 6: log(pi / (1 - pi))
EQ6 = [math.log(1.5), math.log(3 / 7), math.log(1 / 9)]  # 0.4054651, -0.8472979, -2.1972246


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


def test_prior_and_zero_count():
    p = prior(COUNTS)
    assert p.dtype == torch.float32 and close(p, [0.6, 0.3, 0.1])
    with pytest.raises(ValueError, match="class 1 has count 0"):
        prior([3, 0, 2])
    with pytest.raises(ValueError, match="class 2"):
        bal_bce(torch.zeros(1, 3), torch.tensor([0]), [3, 1, 0])


def test_bias_values():
    assert close(bal_bce_bias(COUNTS), EQ10)
    assert close(bal_bce_bias(COUNTS, "eq6"), EQ6)
    # eq6 and eq10 differ by exactly log(C - 1) = log 2 in every entry
    assert close(bal_bce_bias(COUNTS) - bal_bce_bias(COUNTS, "eq6"), [math.log(2)] * 3)
    with pytest.raises(ValueError, match="eq10, eq6"):
        bal_bce_bias(COUNTS, "eq7")


def test_bias_uniform_prior_is_zero():
    assert bal_bce_bias([7, 7, 7, 7]).abs().max() < 1e-6
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert close(bal_bce(z, y, [7, 7, 7, 7]), bce(z, y))


def test_theorem3_test_prior():
    # pi_s = (.6, .3, .1), pi_t = (.2, .3, .5):
    # B_0 = log(.6/.2) - log(.4/.8) = log 6;  B_1 = 0;  B_2 = log(.1/.5) - log(.9/.5) = log(1/9)
    assert close(bal_bce_bias(COUNTS, test_prior=[2, 3, 5]), [math.log(6), 0.0, math.log(1 / 9)])
    # a uniform test prior gives Eq. 10 (probabilities or counts)
    assert close(bal_bce_bias(COUNTS, test_prior=[1 / 3] * 3), EQ10)
    assert close(bal_bce_bias(COUNTS, test_prior=[50, 50, 50]), EQ10)
    with pytest.raises(ValueError, match="eq6"):
        bal_bce_bias(COUNTS, "eq6", test_prior=[1, 1, 1])


def test_eq8_balanced_sigmoid():
    z = torch.linspace(-4, 4, 9)[:, None].expand(9, 3)
    pi = torch.tensor([0.6, 0.3, 0.1])
    expected = pi * z.exp() / (pi * z.exp() + 1 - pi)
    assert close(torch.sigmoid(z + bal_bce_bias(COUNTS, "eq6")), expected)


def test_bal_bce_value_by_hand():
    # z = 0, true class 2: sigmoid(B_c) = 2 pi / (1 + pi) = .75, 6/13, 2/11
    # loss = -log(1 - .75) - log(1 - 6/13) - log(2/11) = log 4 + log(13/7) + log 5.5
    z, y = torch.zeros(1, 3), torch.tensor([2])
    assert close(bal_bce(z, y, COUNTS), 3.7100817)
    assert close(bce(z, y), 3 * math.log(2))  # sum over classes, not mean


def test_bal_bce_gradient_favours_the_tail():
    # dL/dz_c = sigmoid(z_c + B_c) - t_c. At z = 0, plain BCE gives -1/2 (true) and +1/2 (negative);
    # Bal-BCE gives 2/11 - 1 = -9/11 for the true tail class (pushed up harder) and +2/11 for the tail
    # class as a negative (pushed down less), while the head as a negative gets +3/4 (pushed down harder).
    def grad(loss_fn, y):
        z = torch.zeros(1, 3, requires_grad=True)
        loss_fn(z, torch.tensor([y])).backward()
        return z.grad[0]

    plain_true, bal_true = grad(bce, 2), grad(lambda z, y: bal_bce(z, y, COUNTS), 2)
    assert close(plain_true[2], -0.5) and close(bal_true[2], -9 / 11)
    plain_neg, bal_neg = grad(bce, 0), grad(lambda z, y: bal_bce(z, y, COUNTS), 0)
    assert close(plain_neg[2], 0.5) and close(bal_neg[2], 2 / 11)
    assert close(bal_neg[0], 0.75 - 1) and close(bal_true[0], 0.75)
    assert bal_true[2] < plain_true[2] < 0 < bal_neg[2] < plain_neg[2]


def test_tau_scales_the_whole_bias():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 2])
    b = torch.tensor(EQ10)
    assert close(bal_bce(z, y, COUNTS, tau=2.0), bce(z + 2 * b, y), 1e-5)
    assert close(bal_bce(z, y, COUNTS, tau=0.0), bce(z, y))
    log_pi = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert close(bal_ce(z, y, COUNTS, tau=0.5), ce(z + 0.5 * log_pi, y), 1e-5)


def test_ce_by_hand_and_bal_ce_uniform():
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    # log(1 + e^-2) = 0.1269280, log(1 + e^2) = 2.1269280
    assert close(ce(z[:1], torch.tensor([0])), 0.1269280)
    assert close(ce(z, torch.tensor([0, 1])), (0.1269280 + 2.1269280) / 2)
    z3, y3 = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert close(bal_ce(z3, y3, [5, 5, 5]), ce(z3, y3))


def test_soft_targets_mixup_is_convex_combination():
    z = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.7, 0.3]])  # 0.7 * onehot(0) + 0.3 * onehot(1)
    assert close(ce(z, t), 0.7 * 0.1269280 + 0.3 * 2.1269280)


# the other losses: tests/test_losses_lt.py, tests/test_modules.py
@pytest.mark.parametrize("name", ["bal_bce", "bal_ce", "bce", "cb_ce", "ce", "focal"])
def test_one_hot_soft_equals_hard_and_mixup_is_linear(name):
    g = torch.Generator().manual_seed(0)
    z, y, y2 = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 2, 1]), torch.tensor([1, 1, 0, 2, 0])
    loss = build_loss(name, COUNTS)
    hard = loss(z, y)
    assert hard.dtype == torch.float32 and hard.dim() == 0
    assert close(loss(z, torch.eye(3)[y]), hard)
    if name != "cb_ce":  # linear in the targets; cb_ce's per-sample weight sum_c t_c w_c is not
        mixed = loss(z, 0.7 * torch.eye(3)[y] + 0.3 * torch.eye(3)[y2])
        assert close(mixed, 0.7 * hard + 0.3 * loss(z, y2), 1e-5)


def test_bf16_autocast_stays_float32():
    # counts [999, 1]: B = (log 999, -log 999) (C - 1 = 1); z = 0, true class 1:
    # loss = log(1 + e^{log 999}) * 2 = 2 log 1000 = 13.8155106. A bf16 bias (6.90625) would give ~13.8145.
    z = torch.zeros(1, 2, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bal_bce(z, torch.tensor([1]), [999, 1])
        built = build_loss("bal_bce", [999, 1])(z, torch.tensor([1]))
    assert loss.dtype == torch.float32 and built.dtype == torch.float32
    assert abs(loss.item() - 13.8155106) < 1e-5 and abs(built.item() - 13.8155106) < 1e-5
    loss.backward()
    assert z.grad.dtype == torch.bfloat16


def test_focal_and_cb_ce_by_hand():
    z, y = torch.zeros(1, 3), torch.tensor([2])
    # p = 1/3: (1 - 1/3)^2 * log 3
    assert close(focal(z, y), (4 / 9) * math.log(3))
    zz, yy = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert close(focal(zz, yy, gamma=0.0), ce(zz, yy))
    # beta = .5: (1 - beta) / (1 - beta^n) = 32/63, 4/7, 1 -> sum 131/63 -> normalised 96, 108, 189 / 131
    assert close(cb_weights(COUNTS, 0.5), [96 / 131, 108 / 131, 189 / 131])
    assert close(cb_ce(z, y, COUNTS, beta=0.5), (189 / 131) * math.log(3))
    assert close(cb_ce(zz, yy, COUNTS, beta=0.0), ce(zz, yy))  # beta = 0: all weights 1


def test_build_loss_errors_and_equivalence():
    with pytest.raises(ValueError, match="bal_bce.*focal"):
        build_loss("mislas", COUNTS)
    with pytest.raises(ValueError, match="takes no option gamma; it accepts: tau, variant, test_prior"):
        build_loss("bal_bce", COUNTS, gamma=2.0)
    with pytest.raises(ValueError, match="accepts: none"):
        build_loss("ce", COUNTS, tau=1.0)
    with pytest.raises(ValueError, match="class 0"):
        build_loss("bal_ce", [0, 2, 3])  # fails at build time, not at the first step
    z, y = torch.randn(3, 3), torch.tensor([2, 0, 1])
    assert close(build_loss("bal_bce", COUNTS, tau=1.5, variant="eq6")(z, y),
                 bal_bce(z, y, COUNTS, tau=1.5, variant="eq6"))
    assert close(build_loss("focal", COUNTS, gamma=1.0)(z, y), focal(z, y, gamma=1.0))
    with pytest.raises(ValueError, match="class_counts has 3 classes, logits have 4"):
        build_loss("bal_bce", COUNTS)(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must be"):
        ce(z, torch.zeros(3, 2))
