"""Second stages on a frozen backbone (livt.stages): tau-norm's sweep and its val-only choice, NCM's class
means, label-aware smoothing's targets, what each method leaves untouched (a timm ResNet with BatchNorm
for the buffers), exact resume of a trained second stage, and every method end to end (stage 1 then 2)."""

import json
import math
import shutil
import signal

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from livt import config as c
from livt import engine, finetune, stages
from livt.checkpoint import load_classifier
from livt.data import build_dataset
from livt.data.stats import class_counts
from livt.losses import build_loss, las_epsilons
from livt.models.heads import CosineHead
from livt.optim import build_optimizer, set_lr
from tests.conftest import REPO
from tests.test_resume import assert_same_tensors, launch, metrics

STAGE2_METHODS = ["crt", "lws", "mislas", "tau_norm", "ncm"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """{stage-1 method: classifier file}, each trained once on the tiny preset (1 epoch, from scratch)."""
    out, made = tmp_path_factory.mktemp("stage1"), {}

    def get(method: str):
        if method not in made:
            run_dir = finetune.main(["--data", "tiny", "--method", method, "--from_scratch", "--optim.epochs", "1",
                                     "--output_dir", str(out), "--run_name", method])
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            made[method] = run_dir / "classifier.safetensors"
        return made[method]
    return get


# ---------------------------------------------------------------------------------------------
# Label-aware smoothing (MiSLAS)


def test_label_aware_smoothing_targets_by_hand_for_three_classes():
    counts = [100, 55, 10]  # x = (n - 10) / 90 = 1, 0.5, 0
    assert torch.allclose(las_epsilons(counts, shape="linear"), torch.tensor([0.3, 0.15, 0.0]))
    assert torch.allclose(las_epsilons(counts), torch.tensor([0.3, 0.3 * math.sqrt(0.5), 0.0]))  # concave
    assert torch.allclose(las_epsilons(counts, shape="convex"), torch.tensor([0.3, 0.3 * (1 - math.sqrt(0.5)), 0.0]))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.5]])
    labels = torch.tensor([0, 1, 2])
    log_p = F.log_softmax(logits, dim=1)
    paper = torch.tensor([[0.7, 0.15, 0.15],    # 1 - 0.3 on the true class, 0.3 / 2 on each other
                          [0.075, 0.85, 0.075],  # eps 0.15 for the middle class
                          [0.0, 0.0, 1.0]])      # the smallest class: no smoothing
    code = torch.tensor([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.0, 0.0, 1.0]])  # eps / 3 everywhere
    for spread, t in (("paper", paper), ("code", code)):
        loss = build_loss("label_aware_smoothing", counts, shape="linear", spread=spread)(logits, labels)
        assert torch.isclose(loss, -(t * log_p).sum(1).mean()), spread
    mixed = torch.tensor([[0.5, 0.5, 0.0]])  # a mixup target: the same mixture of the two smoothed rows
    loss = build_loss("label_aware_smoothing", counts, shape="linear", spread="paper")(logits[:1], mixed)
    assert torch.isclose(loss, -((0.5 * paper[0] + 0.5 * paper[1]) * log_p[0]).sum())
    with pytest.raises(ValueError, match="shape"):
        build_loss("label_aware_smoothing", counts, shape="cubic")


# ---------------------------------------------------------------------------------------------
# tau-norm and NCM


def test_tau_zero_is_the_plain_head_and_tau_one_unit_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    assert torch.equal(stages.tau_normalised(w, 0.0), w)
    assert torch.allclose(stages.tau_normalised(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(stages.tau_normalised(w, 2.0), torch.tensor([[0.12, 0.16], [0.0, 2.0]]))


def test_tau_is_chosen_on_val_where_test_would_choose_another():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # logits (a, b * 2^(1 - tau)) of a feature (a, b)
    # val: class 0 needs tau >= 1 (1 > 1.4 * 2^-tau), class 1 needs tau <= 1 (0.5 < 1.2 * 2^-tau)
    val_x, val_y = torch.tensor([[1.0, 0.7], [0.5, 0.6]]), torch.tensor([0, 1])
    # test: both right only at tau = 0
    test_x, test_y = torch.tensor([[1.0, 0.4], [0.5, 0.3]]), torch.tensor([0, 1])
    tau, rows = stages.choose_tau(w, val_x, val_y, [0.0, 1.0, 2.0])
    assert tau == 1.0 and [r["val_mean_class_acc"] for r in rows] == [50.0, 100.0, 50.0]
    assert stages.choose_tau(w, test_x, test_y, [0.0, 1.0, 2.0])[0] == 0.0
    grid = stages.tau_grid(0.0, 2.0, 21)
    assert grid[:3] == [0.0, 0.1, 0.2] and len(grid) == 21


def test_ncm_means_by_hand_and_exact_on_separable_features():
    feats = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    cosine = stages.ncm_head(feats, labels, 2, "cosine", 30.0)
    # class 0: mean of (1, 0) and (1, 1)/sqrt2 points at 22.5 degrees
    assert isinstance(cosine, CosineHead)
    assert torch.allclose(cosine.weight[0], torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    l2 = stages.ncm_head(feats, labels, 2, "l2", 1.0)  # mean (0.5, 2.25); centred rows point along:
    assert torch.allclose(l2.mean, torch.tensor([0.5, 2.25]))
    unit = F.normalize(torch.tensor([[1.5, -2.25], [0.5, -1.25]]), dim=1)
    assert torch.allclose(l2.weight[0], unit.mean(0))
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8) * 5  # 8 classes in orthogonal directions, magnitudes and noise of their own
    y = torch.arange(8).repeat_interleave(30)
    x = centres[y] * torch.rand(len(y), 1, generator=gen).add(0.5) + 0.3 * torch.randn(len(y), 8, generator=gen)
    for metric in stages.NCM_METRICS:
        assert torch.equal(stages.ncm_head(x, y, 8, metric, 1.0)(x).argmax(1), y), metric
    with pytest.raises(c.ConfigError, match="ncm_metric"):
        stages.ncm_head(x, y, 8, "cos", 1.0)


def _ncm_official_set():
    """Fixed random features, 4 imbalanced classes (20 / 10 / 5 / 3) off-centre, and 40 noisier test features."""
    g = torch.Generator().manual_seed(0)
    counts, dim = torch.tensor([20, 10, 5, 3]), 6
    y = torch.arange(4).repeat_interleave(counts)
    centres, offset = torch.randn(4, dim, generator=g) * 1.5, torch.linspace(2.0, -1.0, dim)
    x = centres[y] + torch.randn(len(y), dim, generator=g) + offset
    test = centres[torch.arange(40) % 4] + 1.6 * torch.randn(40, dim, generator=g) + offset
    return x, y, test


def test_ncm_l2_matches_the_official_cl2n_l2_classifier():
    # facebookresearch/classifier-balancing @ f162adef63fdf592d0b8a0f6e52bc481fc08785f, models/KNNClassifier.py
    # (feat_type 'cl2n', dist_type 'l2') with the centroids of run_networks.py get_knncentroids, run on this set
    official_pred = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 1, 1, 2, 3, 0, 1, 2, 3,
                     0, 2, 2, 3, 2, 0, 2, 3, 1, 2, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    official_logits = [[-0.587859, -0.859874, -2.37466, -3.565841], [-0.866229, -0.783562, -2.022382, -3.496669],
                       [-1.223762, -2.754906, -0.363531, -1.353534]]
    x, y, test = _ncm_official_set()
    head = stages.ncm_head(x, y, 4, "l2", 1.0)
    logits = head(test)
    assert logits.argmax(1).tolist() == official_pred
    assert torch.allclose(logits[:3], torch.tensor(official_logits), atol=2e-6)
    cosine = stages.ncm_head(x, y, 4, "cosine", 30.0)(test).argmax(1)
    assert int((cosine != torch.tensor(official_pred)).sum()) == 6  # the paper's reading: 6 of 40 differ


def test_mislas_scaled_head_two_sgd_steps_match_the_official_stage2():
    # dvlab-research/MiSLAS @ 0fc381e333d8a11170851b7af2058c59840969e0: methods.py LearnableWeightScaling and
    # LabelAwareSmoothing (its default shape, concave), train_stage2.py's SGD (momentum 0.9, weight decay on every
    # parameter) at epoch 0 with the CIFAR-10 x100 config (lr 0.1, lr_factor 0.5 on the classifier, wd 2e-4)
    counts, dim = [100, 40, 10, 5], 3
    feats = torch.sin(torch.arange(6 * dim, dtype=torch.float32)).reshape(6, dim) * 2
    target = torch.tensor([0, 1, 2, 3, 0, 2])
    linear = torch.nn.Linear(dim, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.cos(torch.arange(4 * dim, dtype=torch.float32)).reshape(4, dim))
        linear.bias.copy_(torch.tensor([0.3, -0.1, 0.2, -0.4]))
    scaled = stages.ClassScales(linear, train_head=True, head_lr_scale=0.5)
    with torch.no_grad():
        scaled.scale.copy_(torch.tensor([1.0, 0.8, 1.2, 1.5]))
    official_logits = [[0.45249498, -0.54734218, 1.44500172, -2.70609021],
                       [0.56254232, 0.05273730, -0.46927765, 0.90656644]]
    assert torch.allclose(scaled(feats)[:2], torch.tensor(official_logits), atol=1e-6)
    cfg = c.parse_args("stage2", ["--data", "tiny", "--method", "mislas", "--init_classifier", "x",
                                    "--optim.weight_decay", "2e-4"])
    assert cfg.loss.options["shape"] == "concave" and cfg.loss.options["spread"] == "code" and cfg.optim.decay_all
    criterion = build_loss("label_aware_smoothing", counts, head=0.3, tail=0.0)  # the defaults: concave, code
    optimizer = build_optimizer(scaled, cfg.optim, 0.1)
    set_lr(optimizer, 0.1)
    losses = []
    for _ in range(2):
        loss = criterion(scaled(feats), target)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses == pytest.approx([1.635826587677002, 1.5537854433059692], abs=1e-6)
    official_weight = [[0.95449978, 0.60004336, -0.30609027], [-0.97466075, -0.68795502, 0.23125340],
                       [0.96946448, 0.74611074, -0.16321376], [-0.88235879, -0.85571903, -0.04233514]]
    assert torch.allclose(linear.weight, torch.tensor(official_weight), atol=1e-6)
    assert torch.allclose(linear.bias, torch.tensor([0.29147333, -0.10385747, 0.20546526, -0.38664368]), atol=1e-6)
    assert torch.allclose(scaled.scale, torch.tensor([0.87930900, 0.78316957, 1.21127999, 1.47674239]), atol=1e-6)


def test_mislas_recipe_follows_the_official_configs_by_dataset():
    # dvlab-research/MiSLAS @ 0fc381e, config/<set>/*_stage2_mislas.yaml (CIFAR: imb_factor 0.01)
    official = {"cifar10_lt": (0.3, 0.0, False, 0.5, 2e-4), "cifar100_lt": (0.4, 0.1, True, 0.2, 2e-4),
                "imagenet_lt": (0.3, 0.0, True, 0.05, 5e-4), "inat18": (0.3, 0.0, True, 0.05, 1e-4),
                "places_lt": (0.4, 0.1, True, 0.05, 5e-4)}
    for data, expected in official.items():
        cfg = c.parse_args("stage2", ["--data", data, "--method", "mislas", "--init_classifier", "x"])
        got = (cfg.loss.options["head"], cfg.loss.options["tail"], cfg.decoupled.options["shift_bn"],
               cfg.decoupled.options["head_lr_scale"], cfg.optim.weight_decay)
        assert got == expected, data
        assert cfg.loss.options["shape"] == "concave" and cfg.optim.lr == 0.1 and cfg.optim.epochs == 10


def test_lws_folded_head_is_the_scaled_head():
    linear = torch.nn.Linear(6, 4)
    scaled = stages.ClassScales(linear)
    with torch.no_grad():
        scaled.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x = torch.randn(5, 6)
    assert torch.allclose(scaled.folded()(x), linear(x) * scaled.scale, atol=1e-6)
    assert [n for n, p in scaled.named_parameters() if p.requires_grad] == ["scale"]


# ---------------------------------------------------------------------------------------------
# What stays frozen: a timm ResNet with BatchNorm (buffers), trained through the real stage-2 Trainer


def _resnet_stage(tmp_path, method):
    cfg = c.parse_args("stage2", ["--data", "tiny", "--method", method, "--optim.epochs", "1",
                                  "--output_dir", str(tmp_path), "--run_name", method])
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    model.train()  # a few batches so the BN statistics are not their initial values
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = engine.make_accelerator("fp32")
    run_dir = engine.prepare_run_dir(cfg, "stage2", acc)
    train = build_dataset(cfg.data, "train")
    counts = class_counts(train.targets, train.num_classes)
    if method == "ncm":
        head = stages.ncm(acc, model, cfg, run_dir, train, None).head
        stages.set_head(model, head)
        after, trained = model.state_dict(), head
    else:
        trainer = stages.build_trainer(cfg, acc, run_dir, model, train, counts)
        trainer.fit()
        trained = trainer.unwrapped.model.get_classifier()
        after = stages.STAGES2[method].export(trainer.unwrapped.model).state_dict()
    changed = {k for k in before if k not in after or not torch.equal(before[k], after[k])}  # NCM: no bias
    return before, after, changed, trained


@pytest.mark.parametrize("method", ["crt", "lws", "ncm"])
def test_decoupled_stages_leave_every_backbone_parameter_and_buffer_bitwise_unchanged(tmp_path, method):
    before, after, changed, _ = _resnet_stage(tmp_path, method)
    assert any(k.endswith("running_mean") for k in before)  # the model does have BN buffers
    assert changed == {"fc.weight", "fc.bias"}  # only the head
    assert after.keys() - before.keys() == ({"fc.mean"} if method == "ncm" else set())  # NCM: the training mean


def test_mislas_shifted_bn_changes_only_bn_running_statistics_and_the_head(tmp_path):
    before, after, changed, scaled = _resnet_stage(tmp_path, "mislas")
    assert isinstance(scaled, stages.ClassScales) and scaled.head.weight.requires_grad  # trained with the scales
    assert not torch.equal(scaled.scale, torch.ones(5))  # the scales moved from 1
    assert not torch.equal(scaled.head.weight, before["fc.weight"]) and not torch.equal(scaled.head.bias,
                                                                                         before["fc.bias"])
    bn_stats = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed == bn_stats | {"fc.weight", "fc.bias"}  # every BN layer re-estimated, nothing else
    bn_affine = [k for k in before
                 if k.rsplit(".", 1)[0] + ".running_mean" in before and k.endswith(("weight", "bias"))]
    assert bn_affine and all(torch.equal(before[k], after[k]) for k in bn_affine)


# ---------------------------------------------------------------------------------------------
# Exact resume and end to end


def test_sigkill_mid_second_stage_then_resume_equals_straight_run(tmp_path, stage1):
    # class-balanced batches: 2 optimizer steps of 2 micro-batches per epoch; killed inside step 3
    extra = ["--method", "crt", "--init_classifier", str(stage1("ce")), "--optim.epochs", "2"]
    stage2 = ["-m", "livt.cli", "stage2"]
    launch(stage2, tmp_path / "a", *extra)
    killed = launch(stage2, tmp_path / "b", *extra, "--debug_kill_at_step", "3", check=False)
    assert killed.returncode == -signal.SIGKILL
    launch(stage2, tmp_path / "b", *extra, "--resume", "auto")
    for name in ("classifier.safetensors", "classifier_last.safetensors"):
        assert_same_tensors(tmp_path / "a" / "r" / name, tmp_path / "b" / "r" / name)
    a, b = metrics(tmp_path / "a" / "r"), metrics(tmp_path / "b" / "r")
    assert a == b and sorted(a) == [1, 2, 3, 4]


@pytest.mark.parametrize("method", STAGE2_METHODS)
def test_each_second_stage_end_to_end_after_its_stage1(tmp_path, stage1, monkeypatch, method):
    about = yaml.safe_load((REPO / "configs" / "methods" / f"{method}.yaml").read_text())["about"]
    first = stage1(about["stage1"])
    seen = []  # the splits whose features a method computes itself
    features = stages.features
    monkeypatch.setattr(stages, "features",
                        lambda acc, model, cfg, ds: seen.append(ds.name) or features(acc, model, cfg, ds))
    run_dir = stages.main(["--data", "tiny", "--method", method, "--init_classifier", str(first),
                             "--optim.epochs", "1", "--output_dir", str(tmp_path), "--run_name", method])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert {"selection", "budget", "provenance"} <= results.keys() and results["method"] == method
    assert results["stage2"]["name"] == method and results["stage2"]["stage1_method"] == about["stage1"]
    assert 0 <= results["top1"] <= 100 and (run_dir / "test_results.md").exists()
    load_classifier(run_dir / "classifier.safetensors")  # a whole classifier, loadable as any other
    new, old = load_file(run_dir / "classifier.safetensors"), load_file(first)
    backbone = [k for k in old if not k.startswith("head.")]
    assert all(torch.equal(new[k], old[k]) for k in backbone)  # a ViT has no BN: MiSLAS too leaves it
    data = c.parse_args("finetune", ["--data", "tiny"]).data
    if method == "mislas":
        assert results["stage2"]["shifted_bn_layers"] == 0
    if method == "ncm":
        assert seen == [build_dataset(data, "train").name] and results["budget"]["images_seen"] == 85
    if method == "tau_norm":  # tau from the val split's features alone, never the test split's
        assert seen == [build_dataset(data, "val").name]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best = max(rows, key=lambda r: r["val_mean_class_acc"])
        assert results["selection"]["tau"] == best["tau"] and len(rows) == 21
        assert torch.allclose(new["head.weight"], stages.tau_normalised(old["head.weight"], best["tau"]))
        assert not new["head.bias"].any()


def test_second_stage_bad_requests_name_the_key(tmp_path, stage1):
    base = ["--data", "tiny", "--output_dir", str(tmp_path)]
    with pytest.raises(c.ConfigError, match="--init_classifier"):
        stages.main(base + ["--method", "crt"])
    with pytest.raises(c.ConfigError, match=r"--method crt: .*crt\.yaml is a second stage .*run it with `livt stage2"):
        finetune.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce"))])
    with pytest.raises(c.ConfigError, match="--method ce: .* sets no stage2.*`livt finetune --method ce`"):
        stages.main(base + ["--method", "ce", "--init_classifier", str(stage1("ce"))])
    with pytest.raises(c.ConfigError, match="livt stage2: name the second stage"):
        stages.main(base + ["--init_classifier", str(stage1("ce"))])
    assert not any(tmp_path.iterdir())  # each refused before a run directory exists
    with pytest.raises(c.ConfigError, match="no second stage 'cRT'"):
        stages.main(base + ["--stage2", "cRT", "--init_classifier", str(stage1("ce"))])
    with pytest.raises(c.ConfigError, match="--data.val_from_train"):
        stages.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce")),
                            "--data.val_from_train", "0.2"])
    with pytest.raises(c.ConfigError, match="layer_decay"):
        stages.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce")), "--optim.layer_decay", "0.75"])
    with pytest.raises(c.ConfigError, match=r"trained with data\.mean \[.*differently normalised"):
        stages.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce")), "--data.mean", "0.5,0.5,0.5"])
    with pytest.raises(c.ConfigError, match=r"'decoupled\.shift_bn'.*stage2 'ncm' takes the options: ncm_metric"):
        stages.main(base + ["--method", "ncm", "--init_classifier", str(stage1("ce")),
                            "--decoupled.shift_bn", "true"])
    with pytest.raises(c.ConfigError, match=r"'decoupled\.head_lr_scale'.*'lws' takes the options: shift_bn"):
        stages.main(base + ["--method", "lws", "--init_classifier", str(stage1("ce")),
                            "--decoupled.head_lr_scale", "0.5"])


# ---------------------------------------------------------------------------------------------
# GLAG's Adaptive Feature Generator (second stage `afg`)


def test_tukey_transform_and_class_statistics_by_hand():
    from livt import afg

    x = torch.tensor([[4.0, -9.0], [0.25, 0.0]])
    assert torch.equal(afg.tukey(x, 0.5), torch.tensor([[2.0, -3.0], [0.5, 0.0]]))
    assert torch.allclose(afg.tukey_inverse(afg.tukey(x, 0.5), 0.5), x)
    means, covs = afg.class_stats(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [5.0, 5.0]]),
                                  torch.tensor([0, 0, 0, 1]), 2)
    assert torch.allclose(means, torch.tensor([[2 / 3, 2 / 3], [5.0, 5.0]], dtype=torch.float64))
    assert torch.allclose(covs[0], torch.tensor([[4 / 3, -2 / 3], [-2 / 3, 4 / 3]], dtype=torch.float64))
    assert not covs[1].any()  # one sample: no spread


def _calibration_case():
    """Class 2 (2 samples) is the tail; classes 0 (10) and 1 (6) are larger, class 3 (1) is nearer but smaller."""
    means = torch.tensor([[4.0, 0.0], [1.0, 2.0], [9.0, 9.0], [1.0, 0.1]], dtype=torch.float64)
    covs = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[2.0, 1.0], [1.0, 2.0]], [[0.5, 0.0], [0.0, 0.5]],
                         [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    return torch.tensor([1.0, 0.0]), means, covs, torch.tensor([10, 6, 2, 1])


def test_calibrated_mean_and_covariance_equal_eq8_and_eq9_by_hand():
    from livt import afg

    x, means, covs, counts = _calibration_case()
    # d = 3 (class 0), 2 (class 1); w = 10/3, 6/2 = 3; the weighted mean of the support is (49/19, 18/19)
    mu, cov = afg.calibrate(x, 2, means, covs, counts, beta=0.5, support=2, gamma=0.1)
    assert torch.allclose(mu, torch.tensor([34 / 19, 9 / 19], dtype=torch.float64))
    # 0.25 * diag(0.5) + 0.25 * (10/3 Sigma_0 + 3 Sigma_1) / (19/3) + 0.1 I
    want = torch.tensor([[0.125 + 7 / 19 + 0.1, 9 / 76], [9 / 76, 0.125 + 0.5 + 0.1]], dtype=torch.float64)
    assert torch.allclose(cov, want)
    mu1, cov1 = afg.calibrate(x, 2, means, covs, counts, beta=0.5, support=1, gamma=0.0)  # K = 1: class 1 only
    assert torch.allclose(mu1, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(cov1, 0.25 * covs[2] + 0.25 * covs[1])


def test_generated_features_match_the_calibrated_gaussian():
    from livt import afg

    x, means, covs, counts = _calibration_case()
    roots = torch.stack([afg.cov_root(c) for c in covs])
    gen = torch.Generator().manual_seed(0)
    draws = afg.sample_calibrated(x, 2, means, roots, counts, 0.5, 2, 0.1, 200_000, gen)  # (n, 2)
    mu, cov = afg.calibrate(x, 2, means, covs, counts, beta=0.5, support=2, gamma=0.1)
    # standard errors: ~0.002 on the mean, ~0.003 on the covariance entries at n = 200k
    assert torch.allclose(draws.mean(0), mu, atol=0.01)
    centred = draws - draws.mean(0)
    assert torch.allclose(centred.t() @ centred / (len(draws) - 1), cov, atol=0.015)


def test_beta_rises_with_tail_val_accuracy_and_falls_with_it():
    from livt import afg

    beta = torch.tensor([0.6, 0.6, 0.6, 1.0, 0.0], dtype=torch.float64)
    acc = torch.tensor([0.5, 0.3, 0.4, 0.9, 0.9], dtype=torch.float64)
    before = torch.tensor([0.4, 0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    tail = torch.tensor([True, True, True, True, False])
    new = afg.update_beta(beta, acc, before, tail, 0.05)
    # up, down, same, capped, head
    assert torch.allclose(new, torch.tensor([0.65, 0.55, 0.6, 1.0, 0.0], dtype=torch.float64))


def test_kd_term_is_zero_on_tail_classes_and_follows_the_gbl_schedule():
    from livt import afg

    assert afg.gbl_alpha(0.0, 1.0, 2.0) == 0.0 and afg.gbl_alpha(1.0, 1.0, 2.0) == 1.0
    assert afg.gbl_alpha(0.5, 0.5, 2.0) == pytest.approx(0.5 * (math.sqrt(2) - 1))
    logits, teacher = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 3.0, -1.0]])
    head = torch.tensor([True, False, False])
    tail_sample, head_sample = torch.tensor([1]), torch.tensor([0])
    assert torch.equal(afg.afg_loss(logits, teacher, tail_sample, head, alpha=0.7),
                       F.cross_entropy(logits, tail_sample))
    p, q = F.softmax(teacher, 1), F.log_softmax(logits, 1)
    kd = (p * (p.log() - q)).sum()
    assert torch.isclose(afg.afg_loss(logits, teacher, head_sample, head, alpha=0.7),
                         F.cross_entropy(logits, head_sample) + 0.7 * kd)


def test_afg_end_to_end_leaves_the_backbone_bitwise_unchanged(tmp_path, stage1):
    first = stage1("ce")  # the recipe's stage 1 is `gbl` (another branch); any classifier file works
    run_dir = stages.main(["--data", "tiny", "--method", "glag", "--init_classifier", str(first),
                             "--optim.epochs", "3", "--decoupled.head_min_count", "20", "--output_dir", str(tmp_path),
                             "--run_name", "glag"])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["stage2"]["name"] == "afg" and results["budget"]["epochs"] == 3
    assert len(results["selection"]["tail_beta"]) == 5 and results["selection"]["tail_beta"][0] == 0.0  # head
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows] == [40 * 5 - 85] * 3  # every class topped up to the largest
    new, old = load_file(run_dir / "classifier.safetensors"), load_file(first)
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("head."))
    assert not torch.equal(new["head.weight"], old["head.weight"])


def test_afg_resumed_from_an_epoch_state_equals_the_straight_run(tmp_path, stage1, monkeypatch):
    from livt import afg

    args = ["--data", "tiny", "--method", "glag", "--init_classifier", str(stage1("ce")), "--optim.epochs", "3",
            "--decoupled.head_min_count", "20", "--output_dir", str(tmp_path), "--run_name", "glag"]
    run_dir = stages.main(args)
    straight = tmp_path / "straight.safetensors"
    shutil.copy(run_dir / "classifier.safetensors", straight)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    states = engine.state_dirs(run_dir)
    steps = json.loads((run_dir / "test_results.json").read_text())["budget"]["steps"]  # 3 epochs of 13
    assert [p.name for p in states] == [f"step_{s:09d}" for s in (26, 39)] and steps == 39  # keep_last 2
    for path in [states[-1], run_dir / "classifier.safetensors", run_dir / "metrics.jsonl"]:  # killed in epoch 3
        path.unlink() if path.is_file() else shutil.rmtree(path)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    epochs, generate = [], afg.generate
    monkeypatch.setattr(afg, "generate", lambda *a: epochs.append(1) or generate(*a))
    stages.main([*args, "--resume", "auto"])
    assert len(epochs) == 1  # only the third epoch ran again
    assert_same_tensors(run_dir / "classifier.safetensors", straight)
    again = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in again] == [drop(r) for r in rows]
