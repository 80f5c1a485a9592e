"""Module improvements: ResLT's branches and loss, SADE's experts, losses and test-time aggregation."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState

from livt import finetune, pretrain
from livt.aggregate import Aggregator, combine
from livt.checkpoint import load_classifier, save_model
from livt.losses import build_loss
from livt.losses.modules import inverse_prior, reslt_groups
from livt.models import build_classifier, outputs
from livt.models.heads import CosineHead
from livt.models.reslt import ResLTClassifier
from livt.models.sade import SADEClassifier
from livt.optim import param_groups

CIFAR10_LT_X100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def resnet(**channels) -> torch.nn.Module:
    """A small timm ResNet (one BasicBlock per stage), random init."""
    return timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1], num_classes=5,
                                     **channels)


# ---------------------------------------------------------------------------------------------
# ResLT


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_reslt_fused_logits_are_the_sum_of_branch_logits_through_one_classifier(kind):
    torch.manual_seed(0)
    model = (build_classifier("vit_micro", 32, 8, 5, head="reslt") if kind == "vit"
             else ResLTClassifier(resnet)).eval()
    x = torch.randn(4, 3, 32, 32)
    out = outputs(model, x)
    assert out["branch_logits"].shape == (3, 4, 5) and out["logits"].shape == (4, 5)
    features = model.branch_features(x)  # (3, B, D)
    w, b = model.head.weight, model.head.bias
    for k in range(3):  # every branch through the same W, b
        torch.testing.assert_close(out["branch_logits"][k], features[k] @ w.t() + b)
    torch.testing.assert_close(out["logits"], out["branch_logits"][0] + out["branch_logits"][1]
                               + out["branch_logits"][2])
    torch.testing.assert_close(model(x), out["logits"])
    assert not torch.allclose(features[0], features[1])  # parameter specialisation: distinct branches
    assert sum(isinstance(m, torch.nn.Linear) and m.out_features == 5 for m in model.modules()) == 1


def test_reslt_groups_official_rank_slices_and_the_log_count_option():
    # official code (jiequancui/ResLT CIFAR/cifarTrain_reslt_cifar10.py, cifar100.py): classes sorted by count,
    # medium + tail = classes 2:10 and tail 4:10 on CIFAR-10 (2 / 2 / 6), 35:100 and 70:100 on CIFAR-100
    assert reslt_groups(CIFAR10_LT_X100, split=(0.2, 0.2)).tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    cifar100 = [int(500 * 0.01 ** (i / 99)) for i in range(100)]
    assert reslt_groups(cifar100).tolist() == [0] * 35 + [1] * 35 + [2] * 30  # the default split
    # ImageNet-LT (ImageNetLT/ImageNetTrain_reslt.py): 175 head, 605 medium, 220 tail classes by count
    imagenet = torch.randint(5, 1281, (1000,), generator=torch.Generator().manual_seed(0))
    g = reslt_groups(imagenet, split=(0.175, 0.605))
    assert [(g == k).sum().item() for k in range(3)] == [175, 605, 220]
    assert imagenet[g == 0].min() >= imagenet[g == 1].max() and imagenet[g == 1].min() >= imagenet[g == 2].max()
    # not sorted by count: the same groups, permuted with the classes
    perm = np.random.default_rng(0).permutation(10)
    ranked = reslt_groups(CIFAR10_LT_X100, split=(0.2, 0.2)).tolist()
    assert reslt_groups(np.array(CIFAR10_LT_X100)[perm], split=(0.2, 0.2)).tolist() == [ranked[i] for i in perm]
    with pytest.raises(ValueError, match="reslt split"):
        reslt_groups(CIFAR10_LT_X100, split=(0.7, 0.5))
    with pytest.raises(ValueError, match="unknown reslt groups 'thirds'"):
        reslt_groups(CIFAR10_LT_X100, "thirds")
    # 'log_count' (the paper's "equal imbalance factor" reading)
    groups = reslt_groups(CIFAR10_LT_X100, "log_count").tolist()
    assert groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for counts in (CIFAR10_LT_X100, cifar100):
        counts = np.array(counts)
        g = reslt_groups(counts, "log_count").numpy()
        factors = [counts[g == k].max() / counts[g == k].min() for k in range(3)]
        step = max(counts[:-1] / counts[1:])  # one class's worth of imbalance
        assert max(factors) / min(factors) <= step * 1.01, factors
    assert reslt_groups(np.array(CIFAR10_LT_X100)[perm], "log_count").tolist() == [groups[i] for i in perm]
    with pytest.raises(ValueError, match="same training count"):
        reslt_groups([7, 7, 7], "log_count")


def test_reslt_loss_matches_the_official_code():
    # jiequancui/ResLT @ 9650d9327f7c0ec616dec82e5830173c6f43fa8a, CIFAR/cifarTrain_reslt_cifar10.py l. 147-156
    # run in float64 outside this repo on these inputs, beta 0.9: 4.934501862593508; the same code without its
    # + 1e-7 inside log(softmax) (which livt does not add): 4.934533997412105
    i, c = torch.arange(6.0, dtype=torch.float64)[:, None], torch.arange(10.0, dtype=torch.float64)[None]
    zh, zm = 3 * torch.sin(1.7 * i + 0.9 * c + 0.3), 3 * torch.cos(1.1 * i + 0.7 * c)
    zt = 2 * torch.sin(0.6 * i - 1.3 * c + 1)
    y = torch.tensor([0, 3, 9, 9, 5, 2])
    crit = build_loss("reslt", CIFAR10_LT_X100, alpha=0.9, split=(0.2, 0.2))
    loss = crit({"logits": zh + zm + zt, "branch_logits": torch.stack([zh, zm, zt])}, y)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - 4.934533997412105) < 1e-12
    assert abs(loss.item() - 4.934501862593508) < 4e-5  # the official epsilon's effect


def test_reslt_branch_losses_see_exactly_the_samples_of_their_group():
    counts = [100, 10, 1]  # groups: class 0 head, 1 medium, 2 tail
    assert reslt_groups(counts).tolist() == [0, 1, 2]
    labels = torch.tensor([0, 1, 2, 0])
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5], [2.0, 0.0, 1.0, 3.0]])  # (branch, sample)
    branch_logits = torch.zeros(3, 4, 3)
    branch_logits[:, torch.arange(4), labels] = v  # true-class logit v, others 0: CE = log(e^v + 2) - v
    branch_logits.requires_grad_(True)
    fused = branch_logits.sum(0)
    ce = lambda t: math.log(math.exp(t) + 2) - t  # noqa: E731
    v = v.tolist()
    # one mean over the pooled (branch, sample) pairs: 4 + 2 + 1 of them (official code)
    expected_branch = (sum(ce(t) for t in v[0])        # all four samples
                       + ce(v[1][1]) + ce(v[1][2])     # medium + tail: samples 1, 2
                       + ce(v[2][2])) / 7              # tail: sample 2
    expected_fused = sum(ce(a + b + c) for a, b, c in zip(*v)) / 4
    loss = build_loss("reslt", counts, alpha=0.9)({"logits": fused, "branch_logits": branch_logits}, labels)
    assert loss.item() == pytest.approx(0.1 * expected_fused + 0.9 * expected_branch, rel=1e-6)
    # alpha = 1: only the branch terms; a branch gets no gradient from samples outside its group
    branch_only = build_loss("reslt", counts, alpha=1.0)({"logits": fused, "branch_logits": branch_logits}, labels)
    (grad,) = torch.autograd.grad(branch_only, branch_logits)
    touched = grad.abs().sum(-1) > 0  # (branch, sample)
    assert touched.tolist() == [[True, True, True, True], [False, True, True, False],
                                [False, False, True, False]]
    one_hot = torch.eye(3)[labels]  # soft targets: membership by the largest-mass class
    assert build_loss("reslt", counts, alpha=0.9)({"logits": fused, "branch_logits": branch_logits},
                                                  one_hot).item() == pytest.approx(loss.item(), rel=1e-6)
    # a batch without tail samples: the tail branch adds nothing, the mean is over the pairs present
    head_only = build_loss("reslt", counts, alpha=1.0)({"logits": fused[:1], "branch_logits": branch_logits[:, :1]},
                                                       labels[:1])
    assert head_only.item() == pytest.approx(ce(v[0][0]), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        build_loss("reslt", counts, alpha=1.5)({"logits": fused, "branch_logits": branch_logits}, labels)


# ---------------------------------------------------------------------------------------------
# SADE


def test_sade_inverse_prior_is_by_count_rank_not_by_index():
    # priors 1/8, 5/8, 2/8: class 1 (largest) gets the smallest, class 0 (smallest) the largest
    assert inverse_prior([10, 50, 20]).tolist() == pytest.approx([5 / 8, 1 / 8, 2 / 8])
    assert inverse_prior([10, 50, 20]).tolist() != pytest.approx([2 / 8, 5 / 8, 1 / 8])  # index reversal
    assert inverse_prior([4, 3, 2, 1]).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_sade_loss_by_hand():
    # counts 3 : 1, zero logits, label 1 (the tail class): the three experts' terms
    # forward CE = log 2; uniform: softmax(log pi) = pi, -log 0.25; backward: softmax(log pi - 2 log pi_inv)
    # is proportional to (0.75 / 0.25^2, 0.25 / 0.75^2) = (12, 4/9)
    loss = build_loss("sade", [3, 1], lam=2.0)({"logits": torch.zeros(1, 2),
                                                "expert_logits": torch.zeros(3, 1, 2)}, torch.tensor([1]))
    expected = math.log(2) - math.log(0.25) - math.log((4 / 9) / (12 + 4 / 9))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    soft = build_loss("sade", [3, 1])({"expert_logits": torch.zeros(3, 1, 2)}, torch.tensor([[0.0, 1.0]]))
    assert soft.item() == pytest.approx(expected, rel=1e-6)


def test_sade_experts_trained_by_their_losses_differ_on_the_tail():
    # input-free experts (one logit vector each) fitted to a long-tailed label stream: the forward expert
    # learns the training prior (predicts the head), the uniform one a flat vector, the backward one the
    # inverted prior (predicts the tail)
    counts = [12, 5, 2, 1]
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    v = torch.zeros(3, 4, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.2)
    criterion = build_loss("sade", counts)
    for _ in range(150):
        z = v[:, None, :].expand(3, len(labels), 4)
        loss = criterion({"logits": z.mean(0), "expert_logits": z}, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(v.detach(), -1)  # (expert, class)
    assert p[0].argmax() == 0 and p[2].argmax() == 3
    assert p[2, 3] > 0.5 > 0.1 > p[0, 3]  # the tail class: backward expert confident, forward not
    assert p[1].max() - p[1].min() < 0.02  # uniform expert: flat


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_sade_model_outputs_and_split(kind):
    torch.manual_seed(0)
    model = (build_classifier("vit_micro", 32, 8, 5, head="sade") if kind == "vit"
             else SADEClassifier(resnet)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = outputs(model, x)
    assert out["expert_logits"].shape == (3, 2, 5)
    torch.testing.assert_close(out["logits"], out["expert_logits"].mean(0))
    assert not torch.allclose(out["expert_logits"][0], out["expert_logits"][2])  # independent experts
    if kind == "vit":  # vit_micro (4 blocks): 3 shared, 1 per expert
        assert len(model.shared.model.blocks) == 3 and all(len(e.blocks) == 1 for e in model.experts)
    else:  # stem + layer1..2 shared, layer3 + layer4 (192 / 384 channels) + pool + cosine head per expert
        assert sum(isinstance(m, timm.models.resnet.BasicBlock) for m in model.shared.modules()) == 2
        assert all(isinstance(e[3], CosineHead) and e[3].weight.shape == (5, 384) for e in model.experts)
        assert out["expert_logits"].detach().abs().max().item() <= 30.0  # s cos: |logit| <= 30


# Parameter counts of the official SADE models, built from Vanint/SADE-AgnosticLT at commit cba11b8
# (model/ldam_drw_resnets/expert_resnet_cifar.py ResNet_s([5, 5, 5], num_experts=3, reduce_dimension=True,
# use_norm=True); model/fb_resnets/Expert_ResNeXt.py ResNext([3, 4, 6, 3], groups=32, width_per_group=4,
# num_experts=3, reduce_dimension=True, use_norm=True); Expert_ResNet.py likewise with Bottleneck):
# total, the shared stem + layer1 (ResNet-32 only), one expert's two stages, one expert's classifier.
OFFICIAL_SADE = {
    ("resnet32", 10): (770_896, 23_824, 50_592 + 197_952, 480),
    ("resnet32", 100): (783_856, 23_824, 50_592 + 197_952, 4_800),
    ("resnext50_32x4d", 1000): (42_889_024, None, 4_102_656 + 8_186_880, 1_536_000),
    ("resnet50", 1000): (43_677_248, None, 4_119_552 + 8_421_888, 1_536_000),
}


@pytest.mark.parametrize(("name", "num_classes"), list(OFFICIAL_SADE))
def test_sade_cnn_experts_match_the_official_parameter_counts(name, num_classes):
    total, shared, stages, head = OFFICIAL_SADE[name, num_classes]
    model = build_classifier(name, 32, 0, num_classes, head="sade")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == total
    if shared is not None:
        assert count(model.shared) == shared
    for expert in model.experts:
        assert count(expert[:2]) == stages and count(expert[-1]) == head


def test_composite_models_keep_the_vit_layer_decay_of_their_parts():
    scales = {}
    for head in ("linear", "reslt", "sade"):
        model = build_classifier("vit_micro", 32, 8, 5, head=head)
        names = {id(p): n for n, p in model.named_parameters()}
        scales[head] = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, 0.75)
                        for p in g["params"]}
    plain, reslt, sade = scales["linear"], scales["reslt"], scales["sade"]
    assert reslt["backbone.blocks.2.attn.qkv.weight"] == plain["blocks.2.attn.qkv.weight"] == 0.75 ** 2
    assert reslt["branches.weight"] == reslt["head.weight"] == plain["head.weight"] == 1.0
    assert sade["shared.model.patch_embed.proj.weight"] == plain["patch_embed.proj.weight"] == 0.75 ** 5
    assert sade["experts.2.blocks.3.mlp.fc1.weight"] == plain["blocks.3.mlp.fc1.weight"] == 0.75
    # no weight decay on the position embedding, under its new name
    no_decay = {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0
                for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert "shared.model.pos_embed" in no_decay and "experts.0.blocks.3.mlp.fc1.weight" not in no_decay


@pytest.mark.parametrize("head", ["reslt", "sade"])
def test_composite_models_save_and_load_as_classifier_files(tmp_path, head):
    model = build_classifier("vit_micro", 32, 8, 5, head=head).eval()
    save_model(model, tmp_path / "c.safetensors", "classifier")
    loaded, meta = load_classifier(tmp_path / "c.safetensors")
    assert meta["arch"]["head"] == head and type(loaded) is type(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def stability_logits(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views' expert logits (N, 3, 4) of images of 4 classes (0, 1 head; 2, 3 tail): the forward expert
    is confident and view-stable on head images and flips between views on tail images, the backward
    expert the reverse; the uniform expert flips on every image half the time."""
    n = len(labels)
    views = []
    for view in range(2):
        z = torch.zeros(n, 3, 4)
        flip = (labels + 1 + view) % 4  # view-dependent wrong class
        head = labels < 2
        z[torch.arange(n), 0, torch.where(head | (view == 0), labels, flip)] = 4.0
        z[torch.arange(n), 2, torch.where(~head | (view == 0), labels, flip)] = 4.0
        coin = torch.rand(n, generator=generator) < 0.5
        z[torch.arange(n), 1, torch.where(coin | (view == 0), labels, flip)] = 4.0
        views.append(z)
    return views[0], views[1]


def test_test_time_aggregation_moves_toward_the_expert_of_the_test_prior():
    g = torch.Generator().manual_seed(0)
    forward_set = torch.tensor([0] * 90 + [1] * 90 + [2] * 10 + [3] * 10)
    backward_set = 3 - forward_set
    weights = {}
    for name, labels in (("forward", forward_set), ("backward", backward_set)):
        agg = Aggregator(lr=0.5, batch_size=50, seed=0)
        for _ in range(10):
            agg.fit_pass(*stability_logits(labels, g))  # labels only build the fixed logits
        weights[name] = agg.weights
        assert weights[name].sum().item() == pytest.approx(1.0) and (weights[name] > 0).all()
    fw, bw = weights["forward"], weights["backward"]
    assert fw[0] > 1 / 3 > fw[2] and fw.argmax() == 0, fw
    assert bw[2] > 1 / 3 > bw[0] and bw.argmax() == 2, bw
    z = torch.randn(5, 3, 4)
    torch.testing.assert_close(combine(z, torch.tensor([1.0, 0.0, 0.0])), z[:, 0])


# ---------------------------------------------------------------------------------------------
# End to end


def test_reslt_recipe_runs_end_to_end(tmp_path):
    run_dir = finetune.main(["--data", "tiny", "--from_scratch", "--method", "reslt", "--optim.epochs", "1",
                             "--select", "last", "--output_dir", str(tmp_path)])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["method"] == "reslt" and results["loss"] == "reslt" and "transductive" not in results
    model, meta = load_classifier(run_dir / "classifier.safetensors")
    assert isinstance(model, ResLTClassifier) and meta["config"]["loss"]["alpha"] == 0.995


def test_sade_recipe_with_test_time_aggregation_runs_end_to_end(tmp_path):
    run_dir = finetune.main(["--data", "tiny", "--from_scratch", "--method", "sade", "--optim.epochs", "1",
                             "--select", "last", "--data.test_per_class", "10", "--test_prior_imbalance", "5",
                             "--tta_aggregate", "--tta_epochs", "1",
                             "--output_dir", str(tmp_path)])
    results = json.loads((run_dir / "test_results.json").read_text())
    trans = results["transductive"]
    assert "transductive" in trans["protocol"] and sum(trans["weights"]) == pytest.approx(1.0, abs=1e-3)
    assert results["top1"] is not None  # the inductive result stays the reported one
    rows = json.loads((run_dir / "test_prior_results.json").read_text())
    assert [r["transductive"] for r in rows] == ["no"] * 4 + ["yes"] * 2
    assert {r["test set"] for r in rows if r["transductive"] == "yes"} == {"forward x5", "backward x5"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """The encoder file of a tiny MGP pretraining run (vit_micro, 32 px, patch 8, 4 blocks)."""
    run_dir = pretrain.main(["--data", "tiny", "--optim.epochs", "1", "--run_name", "mgp",
                             "--output_dir", str(tmp_path_factory.mktemp("pre"))])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run_dir / "encoder.safetensors"


def test_sade_and_reslt_take_every_block_from_the_encoder(encoder):
    vit = build_classifier("vit_micro", 32, 8, 5)
    finetune.load_pretrained(vit, str(encoder))
    sade, reslt = (build_classifier("vit_micro", 32, 8, 5, head=head) for head in ("sade", "reslt"))
    fresh = {n: p.clone() for n, p in sade.named_parameters()}
    for model in (sade, reslt):
        finetune.load_pretrained(model, str(encoder))
    want = vit.state_dict()
    assert_equal = torch.testing.assert_close
    shared = sade.shared.model.state_dict()  # embeddings and blocks 0..2
    assert len(sade.shared.model.blocks) == 3 and shared.keys() <= want.keys()
    for name, value in shared.items():
        assert_equal(value, want[name], rtol=0, atol=0)
    for expert in sade.experts:  # each expert's only block is the encoder's block 3
        for name, value in expert.blocks[0].state_dict().items():
            assert_equal(value, want[f"blocks.3.{name}"], rtol=0, atol=0)
    for name, value in reslt.backbone.state_dict().items():
        assert_equal(value, want[name], rtol=0, atol=0)
    # the heads are the models' own, fresh
    assert_equal(sade.experts[1].head.weight, fresh["experts.1.head.weight"], rtol=0, atol=0)
    assert not torch.equal(want["blocks.3.mlp.fc1.weight"], fresh["experts.0.blocks.3.mlp.fc1.weight"])


@pytest.mark.parametrize("method", ["sade", "reslt"])
def test_sade_and_reslt_fine_tune_from_an_encoder(encoder, tmp_path, method):
    run_dir = finetune.main(["--data", "tiny", "--pretrained", str(encoder), "--method", method,
                             "--optim.epochs", "1", "--select", "last", "--output_dir", str(tmp_path)])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["method"] == method and 0.0 <= results["top1"] <= 100.0


def test_tta_needs_a_multi_expert_model(tmp_path):
    from livt.config import ConfigError

    with pytest.raises(ConfigError, match="model.head sade"):
        finetune.main(["--data", "tiny", "--from_scratch", "--method", "reslt", "--tta_aggregate",
                       "--output_dir", str(tmp_path)])
