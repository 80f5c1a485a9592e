"""ViT builder: sin-cos table by hand, init, timm parity (meta device for the big sizes)."""

import math

import pytest
import timm
import torch
from torch import nn

from livt.models import VIT_SIZES, create_vit, resize_pos_embed, sincos_pos_embed

TIMM_NAMES = {
    "vit_tiny": ("vit_tiny_patch16_224", 16),
    "vit_small": ("vit_small_patch16_224", 16),
    "vit_base": ("vit_base_patch16_224", 16),
    "vit_large": ("vit_large_patch16_224", 16),
    "vit_huge": ("vit_huge_patch14_224", 14),
}


def test_unknown_size_lists_valid_names():
    with pytest.raises(ValueError, match="vit_micro, vit_tiny, vit_small, vit_base, vit_large, vit_huge"):
        create_vit("vit_giant", 224, 16)


def test_sincos_hand_computed():
    # D = 8: k = 2, w = (1, 1/100); grid 2 -> patches (r, c) = (0,0), (0,1), (1,0), (1,1)
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    zero = [0.0, 0.0, 1.0, 1.0]  # position 0: sin 0, sin 0, cos 0, cos 0
    one = [s1, s2, c1, c2]
    expected = torch.tensor([
        [0.0] * 8,      # cls
        zero + zero,    # r 0, c 0
        one + zero,     # r 0, c 1: column in the first half
        zero + one,     # r 1, c 0: row in the second half
        one + one,      # r 1, c 1
    ])
    got = sincos_pos_embed(8, 2)
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got, expected)
    # position 3 on a grid of 4, channel of w_1 = 1/10000^(1/4) in D = 16 (k = 4)
    big = sincos_pos_embed(16, 4, cls_token=False)
    assert big.shape == (16, 16)
    r, c = 2, 3
    row = big[r * 4 + c]
    assert row[1].item() == pytest.approx(math.sin(c / 10000 ** 0.25), abs=1e-6)
    assert row[4 + 1].item() == pytest.approx(math.cos(c / 10000 ** 0.25), abs=1e-6)
    assert row[8 + 2].item() == pytest.approx(math.sin(r / 10000 ** 0.5), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(10, 2)


def test_encoder_and_classifier_forms():
    enc = create_vit("vit_micro", 32, 8)
    cls = create_vit("vit_micro", 32, 8, num_classes=7, drop_path_rate=0.1)
    table = sincos_pos_embed(128, 4)[None]
    for m in (enc, cls):
        torch.testing.assert_close(m.pos_embed.detach(), table)
        assert all(n.eps == 1e-6 for n in m.modules() if isinstance(n, nn.LayerNorm))
    assert not enc.pos_embed.requires_grad and cls.pos_embed.requires_grad
    assert isinstance(enc.norm, nn.LayerNorm) and isinstance(enc.fc_norm, nn.Identity)
    assert isinstance(cls.norm, nn.Identity) and isinstance(cls.fc_norm, nn.LayerNorm)
    assert cls.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 32, 32)
    assert enc.forward_features(x).shape == (2, 17, 128)
    # classifier = head(fc_norm(mean of the 16 patch tokens)), cls token excluded
    cls.eval()
    feats = cls.forward_features(x)  # (2, 17, 128)
    torch.testing.assert_close(cls(x), cls.head(cls.fc_norm(feats[:, 1:].mean(1))))
    assert cls(x).shape == (2, 7)


def test_reference_init():
    torch.manual_seed(0)
    m = create_vit("vit_micro", 32, 4, num_classes=100)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and name != "head":
            fan_out, fan_in = mod.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert mod.weight.abs().max() <= bound, name
            assert mod.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            assert torch.all(mod.bias == 0), name
        if isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    proj = m.patch_embed.proj.weight  # (128, 3, 4, 4) viewed as a Linear (128, 48)
    bound = math.sqrt(6 / (128 + 48))
    assert proj.abs().max() <= bound and proj.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # the patch-embed bias keeps PyTorch's Conv2d default, uniform(+-1/sqrt(fan_in)), as the official MAE
    bias, fan_in_bound = m.patch_embed.proj.bias, 1 / math.sqrt(3 * 4 * 4)
    assert bias.abs().max() <= fan_in_bound and bias.abs().max() > fan_in_bound / 2
    assert bias.std().item() == pytest.approx(fan_in_bound / math.sqrt(3), rel=0.25)
    assert m.head.weight.std().item() == pytest.approx(2e-5, rel=0.1) and torch.all(m.head.bias == 0)
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_matches_timm_on_meta_device(name):
    timm_name, patch = TIMM_NAMES[name]
    with torch.device("meta"):
        for kwargs in (dict(num_classes=0), dict(num_classes=1000, global_pool="avg")):
            ours = create_vit(name, 224, patch, **kwargs).state_dict()
            theirs = timm.create_model(timm_name, pretrained=False, **kwargs).state_dict()
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
            assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())
    assert VIT_SIZES[name][0] == ours["pos_embed"].shape[-1]


def test_classifier_loads_strictly_into_timm_with_same_logits():
    torch.manual_seed(0)
    ours = create_vit("vit_tiny", 224, 16, num_classes=5).eval()
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool="avg")
    theirs.eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_resize_pos_embed():
    pos = sincos_pos_embed(16, 4)[None]  # (1, 17, 16)
    assert resize_pos_embed(pos, 4) is pos
    up = resize_pos_embed(pos, 7)
    assert up.shape == (1, 50, 16)
    torch.testing.assert_close(up[:, 0], pos[:, 0])
    # bicubic reproduces a constant field
    const = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 64, 4), 0.5)], dim=1)
    torch.testing.assert_close(resize_pos_embed(const, 12)[:, 1:], torch.full((1, 144, 4), 0.5))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.zeros(1, 1 + 12, 4), 4)
