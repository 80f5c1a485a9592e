"""Second stages on a frozen backbone (livt.stages): tau-norm's sweep and its val-only choice, NCM's class
means, label-aware smoothing's targets, what each method leaves untouched (a timm ResNet with BatchNorm
for the buffers), exact resume of a trained second stage, and every method end to end (stage 1 then 2)."""

import json
import math
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
from livt.optim import param_groups
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
    assert torch.allclose(las_epsilons(counts), torch.tensor([0.3, 0.15, 0.0]))
    assert torch.allclose(las_epsilons(counts, shape="concave"), torch.tensor([0.3, 0.3 * math.sqrt(0.5), 0.0]))
    assert torch.allclose(las_epsilons(counts, shape="convex"), torch.tensor([0.3, 0.3 * (1 - math.sqrt(0.5)), 0.0]))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.5]])
    labels = torch.tensor([0, 1, 2])
    log_p = F.log_softmax(logits, dim=1)
    paper = torch.tensor([[0.7, 0.15, 0.15],    # 1 - 0.3 on the true class, 0.3 / 2 on each other
                          [0.075, 0.85, 0.075],  # eps 0.15 for the middle class
                          [0.0, 0.0, 1.0]])      # the smallest class: no smoothing
    code = torch.tensor([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.0, 0.0, 1.0]])  # eps / 3 everywhere
    for spread, t in (("paper", paper), ("code", code)):
        loss = build_loss("label_aware_smoothing", counts, spread=spread)(logits, labels)
        assert torch.isclose(loss, -(t * log_p).sum(1).mean()), spread
    mixed = torch.tensor([[0.5, 0.5, 0.0]])  # a mixup target: the same mixture of the two smoothed rows
    loss = build_loss("label_aware_smoothing", counts)(logits[:1], mixed)
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
    grid = stages.tau_grid(c.DecoupledConfig())
    assert grid[:3] == [0.0, 0.1, 0.2] and len(grid) == 21


# The official NCM (facebookresearch/classifier-balancing, commit f162ade: the centroids of
# run_networks.py get_knncentroids, the logits of models/KNNClassifier.py with feat_type 'cl2n',
# dist_type 'l2', i.e. -||(x - m) / ||x - m|| - c_k||^2), run in float64 on these features
NCM_FEATS = [[2.0, 0.0, 1.0], [1.0, 1.0, 0.5], [3.0, -1.0, 0.0], [0.0, 3.0, 1.0], [-1.0, 5.0, 2.0],
             [1.0, 1.0, 4.0], [0.5, 2.0, 3.0], [2.0, 0.0, 5.0], [0.0, 0.0, 2.0]]
NCM_LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
NCM_TEST = [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0], [0.0, 1.0, 2.0], [-1.0, 0.5, 0.5]]
OFFICIAL_NCM_MEAN = [0.9444444444444444, 1.2222222222222223, 2.0555555555555554]
OFFICIAL_NCM_LOGITS = [[-0.25109616505606014, -1.8679130312540293, -2.6581345856851875],
                       [-0.6312709376703025, -1.3881219497800803, -2.778731746259716],
                       [-2.297554555275232, -1.4521179808682638, -1.1609697658390972],
                       [-1.3230628258975696, -1.4700420417166011, -1.9065389286786558]]


def test_ncm_matches_the_official_cl2n_l2_logits_and_cosine_is_an_option():
    feats, labels = torch.tensor(NCM_FEATS, dtype=torch.float64), torch.tensor(NCM_LABELS)
    test = torch.tensor(NCM_TEST, dtype=torch.float64)
    head = stages.ncm_head(feats, labels, 3, "cl2n_l2", scale=2.0)  # s / 2 = 1: the official logits
    exact = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(head.mean, torch.tensor(OFFICIAL_NCM_MEAN, dtype=torch.float64), **exact)
    torch.testing.assert_close(head(test), torch.tensor(OFFICIAL_NCM_LOGITS, dtype=torch.float64), **exact)
    assert head(test).argmax(1).tolist() == [0, 0, 2, 0]
    cosine = stages.ncm_head(feats, labels, 3, "cosine", scale=30.0)
    assert isinstance(cosine, CosineHead) and cosine(test).argmax(1).tolist() == [0, 0, 2, 1]  # differs on the last
    # cosine: class 0's normalised mean of (1, 0) and (1, 1) / sqrt 2 points at 22.5 degrees
    two = stages.ncm_head(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0, 1]), 2, "cosine",
                          30.0)
    assert torch.allclose(two.weight[0], torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    with pytest.raises(c.ConfigError, match="--decoupled.ncm: no rule 'l1'"):
        stages.ncm_head(feats, labels, 3, "l1", 30.0)


def test_ncm_heads_save_and_load_and_are_exact_on_separable_features(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8) * 5  # 8 classes in orthogonal directions, magnitudes and noise of their own
    y = torch.arange(8).repeat_interleave(30)
    x = centres[y] * torch.rand(len(y), 1, generator=gen).add(0.5) + 0.3 * torch.randn(len(y), 8, generator=gen)
    for rule in stages.NCM_RULES:
        assert torch.equal(stages.ncm_head(x, y, 8, rule, 30.0)(x).argmax(1), y), rule


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


def _resnet_stage(tmp_path, method, *extra):
    cfg = c.parse_args("finetune", ["--data", "tiny", "--method", method, "--optim.epochs", "1",
                                    "--output_dir", str(tmp_path), "--run_name", method, *extra])
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    model.train()  # a few batches so the BN statistics are not their initial values
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = engine.make_accelerator("fp32")
    run_dir = engine.prepare_run_dir(cfg, "finetune", acc)
    train = build_dataset(cfg.data, "train")
    counts = class_counts(train.targets, train.num_classes)
    if method == "ncm":
        head, *_ = stages.ncm(acc, model, cfg, train, None)
        stages.set_head(model, head)
        after = model.state_dict()
    else:
        trainer = stages.build_trainer(cfg, acc, run_dir, model, train, counts)
        trainer.fit()
        after = stages.STAGES2[method].export(trainer.unwrapped.model).state_dict()
    changed = {k for k in before if k not in after or not torch.equal(before[k], after[k])}  # NCM: no bias
    return before, after, changed


@pytest.mark.parametrize("method", ["crt", "lws", "ncm"])
def test_decoupled_stages_leave_every_backbone_parameter_and_buffer_bitwise_unchanged(tmp_path, method):
    before, after, changed = _resnet_stage(tmp_path, method)
    assert any(k.endswith("running_mean") for k in before)  # the model does have BN buffers
    assert changed == {"fc.weight", "fc.bias"}  # only the head
    assert after.keys() - before.keys() == ({"fc.mean"} if method == "ncm" else set())  # NCM: its feature mean


def test_mislas_shifted_bn_changes_only_bn_running_statistics_and_the_head(tmp_path):
    before, after, changed = _resnet_stage(tmp_path, "mislas")
    bn_stats = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed == bn_stats | {"fc.weight", "fc.bias"}  # every BN layer re-estimated, nothing else
    bn_affine = [k for k in before
                 if k.rsplit(".", 1)[0] + ".running_mean" in before and k.endswith(("weight", "bias"))]
    assert bn_affine and all(torch.equal(before[k], after[k]) for k in bn_affine)
    _, _, changed = _resnet_stage(tmp_path / "no_shift", "mislas", "--decoupled.shift_bn", "false")
    assert changed == {"fc.weight", "fc.bias"}  # the official CIFAR-10 configs: BN statistics kept


def test_mislas_recipe_loss_equals_the_official_label_aware_smoothing():
    # dvlab-research/MiSLAS methods.py LabelAwareSmoothing (commit 0fc381e; shape 'concave', the default
    # train_stage2.py uses), smooth_head 0.3, smooth_tail 0.0, CIFAR-10-LT x100 counts, its eps table in float64
    recipe = c.parse_args("finetune", ["--data", "tiny", "--method", "mislas"]).loss
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    logits = torch.tensor([[((i * 7 + j * 3) % 11 - 5) * 0.7 for j in range(10)] for i in range(4)],
                          dtype=torch.float64)
    loss = build_loss("label_aware_smoothing", counts, head=recipe.las_head, tail=recipe.las_tail,
                      shape=recipe.las_shape, spread=recipe.las_spread)(logits, torch.tensor([0, 3, 9, 5]))
    assert loss.item() == pytest.approx(4.576292430423996, rel=1e-7)  # livt keeps the eps table in float32


def test_mislas_trains_head_and_scales_at_the_official_learning_rates():
    # dvlab-research/MiSLAS train_stage2.py (commit 0fc381e): SGD over the classifier at lr_factor * lr and
    # LearnableWeightScaling (ones(1, C)) at lr, outputs learned_norm * classifier(feat)
    cfg = c.parse_args("finetune", ["--data", "tiny", "--method", "mislas", "--decoupled.mislas_head_lr", "0.2"])
    model = torch.nn.Sequential()
    model.num_features, model.num_classes = 4, 3
    model.fc = torch.nn.Linear(4, 3)
    model.get_classifier = lambda: model.fc
    scaled = stages.mislas_head(model, cfg)
    assert model.fc is scaled and scaled.head.weight.requires_grad and scaled.scale.requires_grad
    groups = {round(g["lr_scale"], 6): {id(p) for p in g["params"]}
              for g in param_groups(scaled, cfg.optim.weight_decay, decay_all=True)}
    assert groups == {0.2: {id(scaled.head.weight), id(scaled.head.bias)}, 1.0: {id(scaled.scale)}}
    x = torch.randn(5, 4)
    with torch.no_grad():
        scaled.scale.copy_(torch.tensor([0.5, 2.0, 1.5]))
    torch.testing.assert_close(stages.fold_scales(model).fc(x), scaled(x))
    recipe = c.parse_args("finetune", ["--data", "tiny", "--method", "mislas"])
    assert recipe.loss.las_shape == "concave" and recipe.loss.las_spread == "code" and recipe.decoupled.mislas_scales
    cifar10 = c.parse_args("finetune", ["--data", "cifar10_lt", "--method", "mislas"])
    assert not cifar10.decoupled.shift_bn and cifar10.decoupled.mislas_head_lr == 0.5
    cifar100 = c.parse_args("finetune", ["--data", "cifar100_lt", "--method", "mislas"])
    assert cifar100.decoupled.shift_bn and (cifar100.loss.las_head, cifar100.loss.las_tail) == (0.4, 0.1)


# ---------------------------------------------------------------------------------------------
# Exact resume and end to end


def test_sigkill_mid_second_stage_then_resume_equals_straight_run(tmp_path, stage1):
    # class-balanced batches: 2 optimizer steps of 2 micro-batches per epoch; killed inside step 3
    extra = ["--method", "crt", "--init_classifier", str(stage1("ce")), "--optim.epochs", "2"]
    launch("finetune_bft.py", tmp_path / "a", *extra)
    killed = launch("finetune_bft.py", tmp_path / "b", *extra, "--debug_kill_at_step", "3", check=False)
    assert killed.returncode == -signal.SIGKILL
    launch("finetune_bft.py", tmp_path / "b", *extra, "--resume", "auto")
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
    run_dir = finetune.main(["--data", "tiny", "--method", method, "--init_classifier", str(first),
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
        assert results["stage2"]["shifted_bn_layers"] == 0  # tiny's top level: shifted BN on (a ViT: none)
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
        finetune.main(base + ["--method", "crt"])
    with pytest.raises(c.ConfigError, match="no second stage 'cRT'"):
        finetune.main(base + ["--stage2", "cRT", "--init_classifier", str(stage1("ce"))])
    with pytest.raises(c.ConfigError, match="--data.val_from_train"):
        finetune.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce")),
                              "--data.val_from_train", "0.2"])
    with pytest.raises(c.ConfigError, match="layer_decay"):
        finetune.main(base + ["--method", "crt", "--init_classifier", str(stage1("ce")), "--optim.layer_decay", "0.75"])
    with pytest.raises(c.ConfigError, match="--decoupled.ncm: no rule 'l1'; choose one of cl2n_l2, cosine"):
        finetune.main(base + ["--method", "ncm", "--init_classifier", str(stage1("ce")), "--decoupled.ncm", "l1"])


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
    run_dir = finetune.main(["--data", "tiny", "--method", "glag", "--init_classifier", str(first),
                             "--optim.epochs", "3", "--afg.head_min_count", "20", "--output_dir", str(tmp_path),
                             "--run_name", "glag"])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["stage2"]["name"] == "afg" and results["budget"]["epochs"] == 3
    assert len(results["selection"]["tail_beta"]) == 5 and results["selection"]["tail_beta"][0] == 0.0  # head
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows] == [40 * 5 - 85] * 3  # every class topped up to the largest
    new, old = load_file(run_dir / "classifier.safetensors"), load_file(first)
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("head."))
    assert not torch.equal(new["head.weight"], old["head.weight"])
