"""CNN backbones on their own recipe: ResNet-32 (option-A shortcuts), timm ResNet-50 / ResNeXt-50 on the
meta device, the CNN recipes value by value, the step schedule and SGD decay-all, the pad crop, the CNN
hand-off file and a short end-to-end run with `livt evaluate` on its classifier."""

import json

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from livt import config as c
from livt import evaluate, finetune
from livt.checkpoint import CheckpointError, arch_of, load_classifier, load_encoder, save_model
from livt.data.transforms import finetune_transform
from livt.engine import Plan
from livt.models import build_classifier, outputs
from livt.models.cnn import ShortcutA
from livt.models.heads import CosineHead
from livt.optim import build_optimizer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------
# Models


def test_resnet32_size_shapes_and_timm_protocol():
    model = build_classifier("resnet32", 32, 0, 10)
    assert sum(p.numel() for p in model.parameters()) == 464_154  # He et al. / LDAM-DRW's ResNet-32
    x = torch.randn(2, 3, 32, 32)
    fmap = model.forward_features(x)
    assert fmap.shape == (2, 64, 8, 8)
    assert model.forward_head(fmap, pre_logits=True).shape == (2, 64)
    assert model(x).shape == (2, 10) and model.num_features == 64 and model.num_classes == 10
    assert model.get_classifier() is model.fc and isinstance(model.fc, torch.nn.Linear)
    torch.testing.assert_close(model(x), model.forward_head(fmap))


def test_option_a_shortcut_is_parameter_free_and_pads_zeros():
    model = build_classifier("resnet32", 32, 0, 10)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(not list(m.parameters()) for m in shortcuts)  # 16->32, 32->64
    x = torch.arange(2 * 16 * 8 * 8, dtype=torch.float32).reshape(2, 16, 8, 8)
    out = ShortcutA(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))
    assert out[0, 0].tolist()[1] == [16.0, 18.0, 20.0, 22.0]  # row 2 of an 8-wide map, every other column


def test_resnet32_kaiming_normal_init():
    torch.manual_seed(0)
    model = build_classifier("resnet32", 32, 0, 100)
    conv = model.layer3[1].conv1.weight  # (64, 64, 3, 3): fan-in 576
    assert conv.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.03)
    assert model.fc.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)  # (100, 64)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))


def test_resnet32_refuses_drop_path():
    with pytest.raises(ValueError, match="model.drop_path_rate.*resnet32"):
        build_classifier("resnet32", 32, 0, 10, drop_path_rate=0.1)


@pytest.mark.parametrize("name,count", [("resnet50", 25_557_032), ("resnext50_32x4d", 25_028_904)])
def test_timm_cnns_on_the_meta_device(name, count):
    with torch.device("meta"):
        model = build_classifier(name, 224, 0, 1000)
        reference = timm.create_model(name, pretrained=False, num_classes=1000)
        cosine = build_classifier(name, 224, 0, 1000, head="cosine")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters()) == count
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert isinstance(cosine.fc, CosineHead) and sum(p.numel() for p in cosine.parameters()) == count - 1000
    out = outputs(cosine, torch.empty(2, 3, 224, 224, device="meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"features": (2, 2048), "logits": (2, 1000),
                                                             "cosine": (2, 1000)}
    assert arch_of(cosine) == {"name": name, "img_size": 224, "num_classes": 1000, "head": "cosine",
                               "head_scale": 30.0}


def test_resnet32_cosine_head_outputs():
    model = build_classifier("resnet32", 32, 0, 10, head="cosine", head_scale=30.0)
    out = outputs(model, torch.randn(3, 3, 16, 16))  # fully convolutional: any size
    assert out["features"].shape == (3, 64) and out["cosine"].abs().max() <= 1 + 1e-6
    torch.testing.assert_close(out["logits"], 30.0 * out["cosine"])
    # kaidic/LDAM-DRW models/resnet_cifar.py NormedLinear: uniform(-1, 1), each class vector renormed to 1
    norms = model.fc.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10), atol=1e-6, rtol=0)
    assert model.fc.weight.abs().max() <= 1.0 and model.fc.weight.std() > 0.5 / 64 ** 0.5


# ---------------------------------------------------------------------------------------------
# The recipes

CIFAR_PROTOCOL = {  # REFERENCE.md 5b: the LDAM-DRW protocol on CIFAR-LT
    "model.name": "resnet32", "model.drop_path_rate": 0.0,
    "optim.name": "sgd", "optim.epochs": 200, "optim.batch_size": 128, "data.batch_size": 128, "optim.lr": 0.1,
    "optim.warmup_epochs": 5.0, "optim.schedule": "step", "optim.step_epochs": (160, 180),
    "optim.step_gamma": 0.01, "optim.weight_decay": 2e-4, "optim.decay_all": True, "optim.momentum": 0.9,
    "optim.nesterov": False, "optim.layer_decay": 1.0, "loss.label_smoothing": 0.0, "aug.mixup": 0.0,
    "aug.cutmix": 0.0, "aug.rand_augment": "", "aug.reprob": 0.0, "aug.color_jitter": 0.0, "aug.crop": "pad",
    "aug.pad": 4, "data.eval_crop": 1.0, "data.sampler": "instance", "data.img_size": 32,
}
# what a ViT recipe sets and a CNN recipe must set itself, not inherit
VIT_DEFAULTS = ("loss.label_smoothing", "aug.mixup", "aug.cutmix", "aug.rand_augment", "aug.crop_scale",
                "aug.reprob", "optim.layer_decay", "model.drop_path_rate", "optim.lr", "optim.decay_all")


@pytest.mark.parametrize("method,loss,head", [("resnet_ce", "ce", "linear"), ("resnet_bal_ce", "bal_ce", "linear"),
                                              ("ldam_drw", "ldam", "cosine")])
def test_cnn_recipes_resolve_to_the_ldam_protocol_on_cifar(method, loss, head):
    cfg = c.resolve("finetune", "cifar10_lt", method)
    flat = c.flatten(c.to_dict(cfg))
    for key, value in CIFAR_PROTOCOL.items():
        assert flat[key] == (list(value) if isinstance(value, tuple) else value), key
    assert cfg.loss.name == loss and cfg.model.head == head and cfg.method == method
    if head == "cosine":
        assert cfg.model.head_scale == 30.0  # LDAM's s
    sources = c.sources_of(cfg)
    for key in VIT_DEFAULTS:
        assert sources[key] == f"configs/methods/{method}.yaml", key
    # the CIFAR-100 preset gets the same protocol
    assert c.flatten(c.to_dict(c.resolve("finetune", "cifar100_lt", method)))["optim.step_epochs"] == [160, 180]


@pytest.mark.parametrize("data,name,wd,jitter", [("imagenet_lt", "resnext50_32x4d", 5e-4, 0.4),
                                                  ("places_lt", "resnet50", 5e-4, 0.4),
                                                  ("inat18", "resnet50", 1e-4, 0.0)])
def test_cnn_recipes_use_the_90_epoch_protocol_on_the_large_sets(data, name, wd, jitter):
    cfg = c.resolve("finetune", data, "resnet_ce")
    o, a = cfg.optim, cfg.aug
    assert (cfg.model.name, cfg.data.img_size, cfg.data.eval_crop) == (name, 224, 0.875)
    assert (o.name, o.epochs, o.batch_size, o.lr, o.schedule, o.min_lr, o.warmup_epochs) == (
        "sgd", 90, 512, 0.2, "cosine", 0.0, 0.0)
    assert (o.weight_decay, o.decay_all, o.momentum, o.layer_decay) == (wd, True, 0.9, 1.0)
    assert (a.crop, a.crop_scale, a.color_jitter, a.rand_augment, a.mixup, a.cutmix, a.reprob) == (
        "rrc", (0.08, 1.0), jitter, "", 0.0, 0.0, 0.0)
    assert cfg.loss.label_smoothing == 0.0 and cfg.model.drop_path_rate == 0.0


def test_step_schedule_at_the_epoch_boundaries():
    optim = c.resolve("finetune", "cifar10_lt", "resnet_ce").optim
    plan = Plan.make(optim, micro_batch=128, world=1, batches_per_epoch=10)  # 10 steps an epoch
    assert (plan.warmup_steps, plan.total_steps, plan.milestones, plan.lr) == (50, 2000, (1600, 1800), 0.1)
    expected = {0: 0.0, 10: 0.02, 25: 0.05, 49: 0.098, 50: 0.1, 1599: 0.1, 1600: 0.001, 1799: 0.001,
                1800: 0.00001, 1999: 0.00001}
    for step, lr in expected.items():
        assert plan.lr_at(step, optim) == pytest.approx(lr, rel=1e-9, abs=1e-15), step


def test_sgd_with_decay_all_is_one_decayed_group():
    optim = c.resolve("finetune", "cifar10_lt", "resnet_ce").optim
    model = build_classifier("resnet32", 32, 0, 10)
    opt = build_optimizer(model, optim, 0.1)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    (group,) = opt.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (2e-4, 0.9, False)
    optim.decay_all = False  # the ViT grouping: biases and BN parameters out of the decay
    groups = build_optimizer(model, optim, 0.1).param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 2e-4]


# ---------------------------------------------------------------------------------------------
# The pad crop


def test_pad_crop_shifts_by_at_most_pad_and_fills_zeros():
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    t = finetune_transform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), rand_augment="", reprob=0.0, crop="pad", pad=4)
    assert [type(s).__name__ for s in t.transforms] == ["Resize", "RandomCrop", "RandomHorizontalFlip",
                                                         "ToTensor", "Normalize"]
    shifted = 0
    for seed in range(20):
        torch.manual_seed(seed)
        x = t(image)[0]  # (8, 8): 1 where the image is, 0 in the padding
        rows, cols = x.amax(1).sum().item(), x.amax(0).sum().item()
        assert set(x.unique().tolist()) <= {0.0, 1.0} and rows >= 4 and cols >= 4
        assert x.sum().item() == rows * cols  # one rectangle of image: a translation, nothing resampled
        shifted += rows * cols < 64
    assert shifted > 10  # 81 offsets, one of them the identity
    with pytest.raises(ValueError, match="aug.crop.*rrc, pad"):
        finetune_transform(8, (0.0,) * 3, (1.0,) * 3, crop="random")


# ---------------------------------------------------------------------------------------------
# Hand-off files


def test_cnn_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    for head in ("linear", "cosine"):
        model = build_classifier("resnet32", 32, 0, 5, head=head).eval()
        path = tmp_path / f"{head}.safetensors"
        save_model(model, path, "classifier", arch_of(model), dataset="synthetic")
        again, meta = load_classifier(path)
        assert meta["arch"] == {"name": "resnet32", "img_size": 32, "num_classes": 5, "head": head,
                                **({"head_scale": 30.0} if head == "cosine" else {})}
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(again(x), model(x))
    with pytest.raises(CheckpointError, match="ViTs.*from scratch"):
        load_encoder(model, path)


def colour_cifar(root, per_class: int = 40, test_per_class: int = 10):
    """A CIFAR-format folder whose 10 classes differ by the colour of a central square (the pipeline's
    check, not a benchmark): a ResNet-32 learns it in a few dozen steps."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (10, 3))
    root.mkdir()
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), n)
        images = rng.normal(128, 30, (len(labels), 32, 32, 3))
        images[:, 8:24, 8:24] = palette[labels][:, None, None] + rng.normal(0, 10, (len(labels), 16, 16, 3))
        np.savez(root / f"{split}.npz", images=images.clip(0, 255).astype(np.uint8), labels=labels)
    return root


def test_short_resnet32_run_learns_and_its_classifier_evaluates(tmp_path):
    root = colour_cifar(tmp_path / "cifar")
    # the recipe on the CIFAR path (pad crop, full-frame eval) at 16 px, a quarter of the cost of 32 px
    data = ["--data", "cifar10_lt", "--data.root", str(root), "--data.imbalance", "2", "--data.img_size", "16",
            "--data.num_workers", "0"]
    short = ["--optim.epochs", "6", "--optim.warmup_epochs", "1", "--optim.step_epochs", "4",
             "--data.batch_size", "32", "--optim.batch_size", "32", "--optim.lr", "0.02", "--log_every", "100"]
    run_dir = finetune.main([*data, "--method", "resnet_ce", "--from_scratch", *short,
                             "--output_dir", str(tmp_path / "out"), "--run_name", "r32"])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["model"] == "resnet32" and results["method"] == "resnet_ce"
    assert results["top1"] >= 20.0  # twice chance (10 classes)
    # the hand-off file evaluates to the same numbers
    AcceleratorState._reset_state(reset_partial_state=True)
    eval_dir = evaluate.main([*data, "--checkpoint", str(run_dir / "classifier.safetensors"),
                              "--output_dir", str(tmp_path / "out"), "--run_name", "eval"])
    again = json.loads((eval_dir / "test_results.json").read_text())
    assert again["top1"] == results["top1"] and again["selection"]["rule"] == "given checkpoint"


def test_pretrained_with_a_cnn_is_refused(tmp_path):
    with pytest.raises(c.ConfigError, match="--pretrained.*resnet32.*CNN.*--from_scratch"):
        finetune.main(["--data", "tiny", "--model.name", "resnet32", "--pretrained", str(tmp_path / "e.safetensors"),
                       "--output_dir", str(tmp_path)])
