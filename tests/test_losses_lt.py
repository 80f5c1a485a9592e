"""The long-tailed losses of issue 9 against an independent float64 NumPy transcription of each paper's
equation (loops over samples and labels, no shared code with livt), their float64 gradients
(gradcheck), the reductions the papers state, the schedules as functions of progress, post-hoc logit
adjustment, and one tiny fine-tuning run per method recipe."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from livt import config as c
from livt import evaluate, finetune
from livt.losses import (
    bal_ce,
    bce,
    build_loss,
    cb_bce,
    cb_focal,
    cdt,
    ce,
    gbl,
    ib,
    lade,
    ldam,
    seql,
    weighted_ce,
)
from livt.metrics import POSTHOC_TAUS, choose_posthoc_tau, logit_adjust

COUNTS = np.array([40, 10, 4, 1])  # C = 4, N = 55
PI = COUNTS / COUNTS.sum()
RNG = np.random.default_rng(0)
Z = RNG.normal(size=(5, 4)) * 2  # (B, C) logits
COS = np.tanh(RNG.normal(size=(5, 4)))  # cosines in (-1, 1)
FEAT = RNG.normal(size=(5, 6))  # penultimate features
Y = np.array([0, 1, 2, 3, 0])
Y2 = np.array([1, 3, 0, 2, 0])
HARD = np.eye(4)[Y]
SOFT = 0.7 * np.eye(4)[Y] + 0.3 * np.eye(4)[Y2]
SMOOTH = 0.9 * np.eye(4)[Y] + 0.1 / 4  # label smoothing: every class gets some mass


def t64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def targets(t):
    """The torch form of a target matrix: hard labels when one-hot, else the soft matrix."""
    return torch.as_tensor(t.argmax(1)) if np.array_equal(t, np.eye(4)[t.argmax(1)]) else t64(t)


# ---------------------------------------------------------------------------------------------
# NumPy transcriptions (float64), one per paper equation


def log_softmax(a):
    m = a.max()
    return a - m - math.log(np.exp(a - m).sum())


def np_ce(z, t):
    return np.mean([-(t[i] * log_softmax(z[i])).sum() for i in range(len(z))])


def np_norm(w):
    return w * len(w) / w.sum()


def np_weighted_ce(z, t, counts):
    w = np_norm(1.0 / (counts / counts.sum()))
    return np.mean([(t[i] @ w) * -(t[i] * log_softmax(z[i])).sum() for i in range(len(z))])


def np_cb_sigmoid_focal(z, t, counts, beta, gamma):
    w = np_norm((1 - beta) / (1 - beta ** counts))
    total = []
    for i in range(len(z)):
        p = 1 / (1 + np.exp(-z[i]))
        terms = t[i] * (1 - p) ** gamma * -np.log(p) + (1 - t[i]) * p ** gamma * -np.log(1 - p)
        total.append((t[i] @ w) * terms.sum())
    return np.mean(total)


def np_ldam(cos, t, counts, s, max_margin, progress, drw_start, beta=0.9999):
    """DRW: PyTorch's weighted mean sum_i w_i loss_i / sum_i w_i, as the official code."""
    m = counts ** -0.25
    m = m * max_margin / m.max()
    w = np_norm((1 - beta) / (1 - beta ** counts)) if progress >= drw_start else np.ones(len(counts))
    total = []
    for i in range(len(cos)):
        loss = 0.0
        for label in range(len(counts)):
            if t[i, label]:
                a = s * cos[i].copy()
                a[label] -= s * m[label]
                loss += t[i, label] * -log_softmax(a)[label]
        total.append((t[i] @ w) * loss)
    return np.sum(total) / np.sum(t @ w)


def np_lade(z, t, counts, alpha, lam):
    pi = counts / counts.sum()
    pc = np_ce(z + np.log(pi), t)
    reg = 0.0
    for y in range(len(counts)):
        n_y = t[:, y].sum()  # a class absent from the batch: first term 0, the others count (official code)
        first = (t[:, y] * z[:, y]).sum() / n_y if n_y > 0 else 0.0
        second = math.log(np.mean(np.exp(z[:, y] - np.log(pi[y]) + np.log(1 / len(counts)))))
        reg -= pi[y] * (first - second - lam * second ** 2)
    return pc + alpha * reg


def np_ib(z, t, feat, counts, progress, alpha=1000.0, start=0.5, eps=1e-3):
    if progress < start:
        return np_ce(z, t)
    w = np_norm(1.0 / counts)
    total = []
    for i in range(len(z)):
        p = np.exp(log_softmax(z[i]))
        influence = np.abs(p - t[i]).sum() * np.abs(feat[i]).sum()
        total.append((t[i] @ w) * alpha / (influence + eps) * -(t[i] * log_softmax(z[i])).sum())
    return np.mean(total)


def np_seql(z, t, counts, beta, threshold):
    rare = counts / counts.sum() < threshold
    total = []
    for i in range(len(z)):
        loss = 0.0
        for label in range(len(counts)):
            if t[i, label]:
                w = np.array([1.0 - beta[i, k] * rare[k] * (k != label) for k in range(len(counts))])
                loss += t[i, label] * (-z[i, label] + math.log((w * np.exp(z[i])).sum()))
        total.append(loss)
    return np.mean(total)


def np_cdt(z, t, counts, gamma):
    return np_ce(z / (counts.max() / counts) ** gamma, t)


def np_gbl(z, t, counts, progress, s=1.0, c_=2.0):
    return np_ce(z + s * (c_ ** progress - 1) * np.log(counts / counts.sum()), t)


# ---------------------------------------------------------------------------------------------
# Values against the transcriptions, hard and soft targets


CASES = {
    "weighted_ce": (lambda t, **o: weighted_ce(t64(Z), targets(t), COUNTS),
                    lambda t: np_weighted_ce(Z, t, COUNTS)),
    "cb_focal": (lambda t: cb_focal(t64(Z), targets(t), COUNTS, beta=0.9, gamma=2.0),
                 lambda t: np_cb_sigmoid_focal(Z, t, COUNTS, 0.9, 2.0)),
    "cb_bce": (lambda t: cb_bce(t64(Z), targets(t), COUNTS, beta=0.99),
               lambda t: np_cb_sigmoid_focal(Z, t, COUNTS, 0.99, 0.0)),
    "ldam": (lambda t: ldam(t64(COS), targets(t), COUNTS, progress=0.3, s=30.0, max_margin=0.5),
             lambda t: np_ldam(COS, t, COUNTS, 30.0, 0.5, 0.3, 0.8)),
    "ldam_drw": (lambda t: ldam(t64(COS), targets(t), COUNTS, progress=0.85, s=30.0, max_margin=0.5),
                 lambda t: np_ldam(COS, t, COUNTS, 30.0, 0.5, 0.85, 0.8)),
    "lade": (lambda t: lade(t64(Z), targets(t), COUNTS, alpha=0.5, lam=0.1),
             lambda t: np_lade(Z, t, COUNTS, 0.5, 0.1)),
    "ib": (lambda t: ib(t64(Z), targets(t), t64(FEAT), COUNTS, progress=0.7),
           lambda t: np_ib(Z, t, FEAT, COUNTS, 0.7)),
    "ib_warmup": (lambda t: ib(t64(Z), targets(t), t64(FEAT), COUNTS, progress=0.2),
                  lambda t: np_ib(Z, t, FEAT, COUNTS, 0.2)),
    "cdt": (lambda t: cdt(t64(Z), targets(t), COUNTS, gamma=0.2), lambda t: np_cdt(Z, t, COUNTS, 0.2)),
    "gbl": (lambda t: gbl(t64(Z), targets(t), COUNTS, progress=0.6), lambda t: np_gbl(Z, t, COUNTS, 0.6)),
}


@pytest.mark.parametrize("target", ["hard", "soft", "smooth"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_value_matches_the_paper_equation(name, target):
    t = {"hard": HARD, "soft": SOFT, "smooth": SMOOTH}[target]
    ours, reference = CASES[name]
    value = ours(t)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert abs(value.item() - reference(t)) < 1e-6 * max(1.0, abs(reference(t)))


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_seql_value_with_the_same_bernoulli_draw(target):
    t = HARD if target == "hard" else SOFT
    threshold = 0.1  # classes 2 and 3 (pi = 4/55, 1/55) are rare
    torch.manual_seed(7)
    beta = (torch.rand(5, 4) < 0.9).numpy()  # float32 uniforms, as the loss draws them
    torch.manual_seed(7)
    value = seql(t64(Z), targets(t), COUNTS, gamma=0.9, threshold=threshold)
    assert abs(value.item() - np_seql(Z, t, COUNTS, beta, threshold)) < 1e-9
    assert beta[:, 2:].any() and not beta[:, 2:].all()  # the draw both drops and keeps rare classes


def test_a_one_hot_soft_target_equals_its_hard_label():
    z, y = t64(Z), torch.as_tensor(Y)
    onehot = t64(np.eye(4)[Y])
    for fn in (lambda tt: weighted_ce(z, tt, COUNTS), lambda tt: cb_focal(z, tt, COUNTS),
               lambda tt: ldam(t64(COS), tt, COUNTS, progress=0.9), lambda tt: lade(z, tt, COUNTS),
               lambda tt: ib(z, tt, t64(FEAT), COUNTS, progress=0.9), lambda tt: cdt(z, tt, COUNTS),
               lambda tt: gbl(z, tt, COUNTS, progress=0.5)):
        assert abs(fn(y).item() - fn(onehot).item()) < 1e-12
    torch.manual_seed(3)
    a = seql(z, y, COUNTS, threshold=0.1)
    torch.manual_seed(3)
    assert abs(a.item() - seql(z, onehot, COUNTS, threshold=0.1).item()) < 1e-12


# ---------------------------------------------------------------------------------------------
# Gradients (float64)


GRADS = {
    "weighted_ce": lambda z, t: weighted_ce(z, t, COUNTS),
    "cb_focal": lambda z, t: cb_focal(z, t, COUNTS, beta=0.9, gamma=2.0),
    "cb_bce": lambda z, t: cb_bce(z, t, COUNTS, beta=0.9),
    "ldam": lambda z, t: ldam(torch.tanh(z), t, COUNTS, progress=0.9, s=5.0),
    "lade": lambda z, t: lade(z, t, COUNTS, alpha=0.5),
    "cdt": lambda z, t: cdt(z, t, COUNTS),
    "gbl": lambda z, t: gbl(z, t, COUNTS, progress=0.5),
    "seql": lambda z, t: (torch.manual_seed(5), seql(z, t, COUNTS, threshold=0.1))[1],  # the same draw
}


@pytest.mark.parametrize("target", ["hard", "soft"])
@pytest.mark.parametrize("name", sorted(GRADS))
def test_gradcheck(name, target):
    t = targets(HARD if target == "hard" else SOFT)
    assert torch.autograd.gradcheck(lambda z: GRADS[name](z, t), (t64(Z, grad=True),))


def test_gradcheck_ib_through_logits_and_features():
    t = targets(SOFT)
    assert torch.autograd.gradcheck(lambda z, h: ib(z, t, h, COUNTS, progress=0.9, alpha=10.0),
                                    (t64(Z, grad=True), t64(FEAT, grad=True)))


# ---------------------------------------------------------------------------------------------
# The reductions the papers state


def close(a, b, tol=1e-9):
    return abs(float(a) - float(b)) < tol


def test_reductions():
    z, y, soft = t64(Z), torch.as_tensor(Y), t64(SOFT)
    uniform = [7, 7, 7, 7]
    for t in (y, soft):
        # LDAM with zero margins and s = 1 (no DRW) is CE on the cosines
        assert close(ldam(t64(COS), t, COUNTS, progress=0.0, s=1.0, max_margin=0.0, drw_start=1.0), ce(t64(COS), t))
        # class-balanced with beta = 0: all weights 1
        assert close(cb_bce(z, t, COUNTS, beta=0.0), bce(z, t))
        assert close(cb_focal(z, t, COUNTS, beta=0.0, gamma=0.0), bce(z, t))
        # GBL: CE at progress 0, Bal-CE (tau 1) at progress -> 1 with s = 1, c = 2
        assert close(gbl(z, t, COUNTS, progress=0.0), ce(z, t))
        assert close(gbl(z, t, COUNTS, progress=1 - 1e-9), bal_ce(z, t, COUNTS), 1e-6)
        assert close(cdt(z, t, COUNTS, gamma=0.0), ce(z, t))
        assert close(weighted_ce(z, t, uniform), ce(z, t))
        assert close(lade(z, t, COUNTS, alpha=0.0), bal_ce(z, t, COUNTS), 1e-6)  # PC softmax = Bal-CE
        assert close(ib(z, t, t64(FEAT), COUNTS, progress=0.49), ce(z, t))  # plain CE for the first half
        assert close(seql(z, t, COUNTS, gamma=0.0, threshold=0.5), ce(z, t))  # nothing dropped
        assert close(seql(z, t, COUNTS, gamma=1.0, threshold=0.0), ce(z, t))  # no class is rare
    # post-hoc adjustment with tau = 0 is the identity
    assert torch.equal(logit_adjust(z, COUNTS, 0.0), z)


def test_ldam_margins_and_its_prediction_scale():
    # m_c = n_c^(-1/4) scaled to max 0.5: n = 40, 10, 4, 1 -> 0.5 * (0.398, 0.562, 0.707, 1)
    from livt.losses import ldam_margins
    assert np.allclose(ldam_margins(COUNTS).numpy(), 0.5 * np.array([40 ** -.25, 10 ** -.25, 4 ** -.25, 1.0]),
                       atol=1e-7)
    # margins only in training: with the margins off, LDAM is CE on the cosine head's logits s * cos
    cos, y = t64(COS), torch.as_tensor(Y)
    assert close(ldam(cos, y, COUNTS, progress=0.0, max_margin=0.0, drw_start=1.0), ce(30 * cos, y))
    # a margin only makes the true class harder
    assert ldam(cos, y, COUNTS, progress=0.0, drw_start=1.0) > ce(30 * cos, y)


def test_schedules_are_functions_of_progress():
    z, y = t64(Z), torch.as_tensor(Y)
    # DRW switches exactly at drw_start; >= 1 never switches
    before, after = (ldam(t64(COS), y, COUNTS, progress=p) for p in (0.7999, 0.8))
    assert close(before, np_ldam(COS, HARD, COUNTS, 30, 0.5, 0.0, 1.0), 1e-5)  # float32 margins
    assert close(after, np_ldam(COS, HARD, COUNTS, 30, 0.5, 1.0, 0.0), 1e-5)
    assert close(ldam(t64(COS), y, COUNTS, progress=0.99, drw_start=1.0), before)
    # IB: CE before start, IB after
    assert close(ib(z, y, t64(FEAT), COUNTS, progress=0.4999), ce(z, y))
    assert not close(ib(z, y, t64(FEAT), COUNTS, progress=0.5), ce(z, y))
    # GBL alpha = s (2^p - 1): at p = 0.5, alpha = sqrt 2 - 1
    log_pi = torch.log(t64(PI))
    assert close(gbl(z, y, COUNTS, progress=0.5), ce(z + (math.sqrt(2) - 1) * log_pi, y), 1e-6)
    assert close(gbl(z, y, COUNTS, progress=0.5, s=0.5), ce(z + 0.5 * (math.sqrt(2) - 1) * log_pi, y), 1e-6)
    # the Criterion passes the loop's progress through
    crit = build_loss("ldam", COUNTS, drw_start=0.5)
    out = {"logits": 30 * t64(COS), "cosine": t64(COS)}
    assert close(crit(out, y, 0.6), ldam(t64(COS), y, COUNTS, progress=0.6, drw_start=0.5), 1e-6)
    assert close(crit(out, y, 0.4), ldam(t64(COS), y, COUNTS, progress=0.4, drw_start=0.5), 1e-6)


def test_reweighting_convention_is_the_plain_batch_mean():
    # weighted softmax on counts [3, 1]: w = 1/pi = (4/3, 4), normalised to sum C = 2: (0.5, 1.5).
    # z = 0 gives CE = log 2 per sample. A batch of two tail samples: the plain batch mean of w_i CE_i
    # is 1.5 log 2; PyTorch's weighted mean sum w_i CE_i / sum w_i would give log 2 for any batch.
    z = torch.zeros(2, 2, dtype=torch.float64)
    assert close(weighted_ce(z, torch.tensor([1, 1]), [3, 1]), 1.5 * math.log(2))
    assert close(weighted_ce(z, torch.tensor([0, 0]), [3, 1]), 0.5 * math.log(2))


def test_seql_draw_comes_from_the_reseeded_global_rng():
    z, y = t64(Z), torch.as_tensor(Y)
    values = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        values.append(seql(z, y, COUNTS, threshold=0.1).item())
    assert values[0] == values[1] != values[2]


def test_criterion_equals_the_functions_and_checks_options():
    y = torch.as_tensor(Y)
    z, cos, feat = (torch.tensor(a, dtype=torch.float32) for a in (Z, COS, FEAT))
    out = {"logits": z, "features": feat, "cosine": cos}
    pairs = [
        (build_loss("weighted_ce", COUNTS), weighted_ce(z, y, COUNTS)),
        (build_loss("cb_focal", COUNTS, beta=0.99, gamma=0.5), cb_focal(z, y, COUNTS, beta=0.99, gamma=0.5)),
        (build_loss("cb_bce", COUNTS), cb_bce(z, y, COUNTS)),
        (build_loss("lade", COUNTS, alpha=0.2), lade(z, y, COUNTS, alpha=0.2)),
        (build_loss("cdt", COUNTS, gamma=0.1), cdt(z, y, COUNTS, gamma=0.1)),
    ]
    for crit, expected in pairs:
        assert close(crit(out, y, 0.3), expected, 1e-6), crit.name
    assert close(build_loss("ib", COUNTS)(out, y, 0.9), ib(z, y, feat, COUNTS, progress=0.9), 1e-4)
    assert close(build_loss("gbl", COUNTS, s=0.5)(out, y, 0.7), gbl(z, y, COUNTS, progress=0.7, s=0.5), 1e-6)
    with pytest.raises(ValueError, match="needs the model output.*cosine.*--model.head cosine"):
        build_loss("ldam", COUNTS)({"logits": z, "features": feat}, y)
    with pytest.raises(ValueError, match="needs the model output.*features"):
        build_loss("ib", COUNTS)(z, y)
    for name, bad in [("ldam", dict(s=0.0)), ("ldam", dict(drw_start=-0.1)), ("ldam", dict(drw_beta=1.0)),
                      ("seql", dict(gamma=1.5)), ("cdt", dict(gamma=-1.0)), ("ib", dict(alpha=0.0)),
                      ("gbl", dict(c=0.0)), ("lade", dict(lam=-1.0)), ("cb_focal", dict(gamma=-1.0))]:
        with pytest.raises(ValueError, match=f"{next(iter(bad))}|beta"):
            build_loss(name, COUNTS, **bad)  # refused at build time, naming the option
    with pytest.raises(ValueError, match="class 1 has count 0"):
        build_loss("ldam", [3, 0, 1])
    with pytest.raises(ValueError, match="takes no option tau; it accepts: s, max_margin, drw_start, drw_beta"):
        build_loss("ldam", COUNTS, tau=1.0)


def test_bf16_autocast_stays_float32():
    y = torch.as_tensor(Y)
    cos = torch.tensor(COS, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss("ldam", COUNTS)({"cosine": cos, "logits": 30 * cos}, y, 0.9)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - np_ldam(cos.detach().double().numpy(), HARD, COUNTS, 30, 0.5, 0.9, 0.8)) < 1e-4
    loss.backward()
    assert cos.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Post-hoc logit adjustment


def test_logit_adjust_and_tau_choice():
    z = torch.tensor([[0.0, 0.5], [0.0, 0.5], [1.0, 0.0]])
    counts = [9, 1]  # log pi = (log .9, log .1); z - tau log pi
    assert torch.allclose(logit_adjust(z, counts, 1.0), z - torch.log(torch.tensor([0.9, 0.1])), atol=1e-6)
    # labels (1, 1, 0): tau = 0 already gets all three; the first (smallest) best tau wins
    assert choose_posthoc_tau(z, [1, 1, 0], counts) == 0.0
    # labels (0, 0, 0) are all right only once class 1 is pushed down: z - tau log pi favours class 1,
    # so the best tau is 0 too; labels (1, 1, 1) need the third row flipped: 1 - tau log .9 < -tau log .1
    # <=> tau > 1 / log 9 = 0.455 -> the grid's 0.5
    assert choose_posthoc_tau(z, [1, 1, 1], counts) == 0.5
    assert POSTHOC_TAUS[0] == 0.0 and POSTHOC_TAUS[-1] == 2.0 and len(POSTHOC_TAUS) == 21


def test_posthoc_tau_is_fixed_without_a_heldout_val():
    cfg = SimpleNamespace(posthoc=True)
    split = SimpleNamespace(source="cifar test")
    assert evaluate.posthoc_tau(None, None, cfg, split, split, COUNTS) == (
        1.0, "fixed at 1: no held-out val split (val is the test split)")
    assert evaluate.posthoc_tau(None, None, SimpleNamespace(posthoc=False), split, split, COUNTS) is None


# ---------------------------------------------------------------------------------------------
# One tiny fine-tuning run per new method recipe


@pytest.fixture
def reset_accelerate():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


SMALL = ["--data.max_per_class", "16", "--data.test_per_class", "10"]  # counts 16 .. 2: 3 steps; val 2 per class
NEW_METHODS = ["weighted_ce", "cb_focal", "cb_bce", "ldam", "lade", "ib", "seql", "cdt", "gbl"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_tiny_finetune_run_per_method(tmp_path, method, reset_accelerate):
    extra = ["--posthoc"] if method == "ldam" else []
    run_dir = finetune.main(["--data", "tiny", "--from_scratch", "--method", method, "--optim.epochs", "1",
                             *SMALL, "--output_dir", str(tmp_path), "--run_name", method, *extra])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["method"] == method and results["loss"] == c.read_method(method)[1]["loss.name"]
    assert 0 <= results["top1"] <= 100 and math.isfinite(results["nll"])
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses and all(math.isfinite(v) for v in losses)
    if method == "ldam":  # the recipe puts LDAM on the cosine head; post-hoc chosen on the held-out val
        assert yaml_config(run_dir)["model"]["head"] == "cosine"
        post = results["posthoc"]
        assert set(post) == {"tau", "chosen_on", "top1", "many", "medium", "few", "ece", "mce", "nll"}
        assert post["tau"] in POSTHOC_TAUS and post["chosen_on"].startswith("synthetic_val")
        assert "posthoc" in (run_dir / "test_results.md").read_text()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        # the same from `livt evaluate`; tau = 0 would leave the raw numbers
        eval_dir = evaluate.main(["--data", "tiny", *SMALL, "--posthoc", "--checkpoint",
                                  str(run_dir / "classifier.safetensors"), "--output_dir", str(tmp_path),
                                  "--run_name", "eval"])
        again = json.loads((eval_dir / "test_results.json").read_text())
        assert again["posthoc"]["tau"] == post["tau"] and again["top1"] == results["top1"]
        if post["tau"] == 0:
            assert post["top1"] == results["top1"]


def yaml_config(run_dir):
    import yaml
    return yaml.safe_load((run_dir / "config.yaml").read_text())
