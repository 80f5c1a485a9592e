"""MAE: patch order, masking, masked-only loss, norm-pix targets, gradients, hand-off keys."""

import pytest
import torch
import torch.nn.functional as F

from livt.config import MAEConfig, ModelConfig
from livt.models import MAE, create_mae, create_vit


def tiny_mae(norm_pix_loss: bool = True, patch_size: int = 8) -> MAE:
    torch.manual_seed(0)
    return MAE("vit_micro", 32, patch_size, norm_pix_loss=norm_pix_loss, decoder_embed_dim=64,
               decoder_depth=1, decoder_num_heads=4)


def test_patchify_order_and_round_trip():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch 1 is row 0, column 1; its pixels are in (p, p, c) order
    torch.testing.assert_close(patches[1, 1], imgs[1, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(patches[0, 4], imgs[0, :, 8:16, 0:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(mae.unpatchify(patches), imgs)


def test_random_masking_hand_example():
    x = torch.arange(4.0).view(1, 4, 1) * 10  # tokens 0, 10, 20, 30
    noise = torch.tensor([[0.3, 0.1, 0.4, 0.2]])  # keep the two smallest: patches 1 and 3
    kept, mask, ids_restore = MAE.random_masking(x, 0.5, noise=noise)
    assert kept.flatten().tolist() == [10.0, 30.0]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert ids_restore.tolist() == [[2, 0, 3, 1]]  # argsort of ids_shuffle [1, 3, 0, 2]


@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.9])
def test_random_masking_counts_and_restore(ratio):
    B, L, D = 3, 49, 5
    x = torch.randn(B, L, D)
    kept, mask, ids_restore = MAE.random_masking(x, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(L * (1 - ratio))
    assert kept.shape == (B, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    # append placeholders for the removed tokens, unshuffle: visible tokens land back in place
    filled = torch.cat([kept, torch.zeros(B, L - keep, D)], dim=1)
    restored = torch.gather(filled, 1, ids_restore[..., None].expand(-1, -1, D))
    visible = (mask == 0)[..., None]
    torch.testing.assert_close(torch.where(visible, restored, 0), torch.where(visible, x, 0))
    assert torch.all(restored[~visible.squeeze(-1)] == 0)
    again = MAE.random_masking(x, ratio, generator=torch.Generator().manual_seed(0))[1]
    assert torch.equal(mask, again)


def test_loss_ignores_visible_patches():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = mae(imgs, generator=torch.Generator().manual_seed(0))
    pred = pred.detach()
    base = mae.forward_loss(imgs, pred, mask)
    visible = (mask == 0)[..., None]
    assert mae.forward_loss(imgs, torch.where(visible, pred + 5.0, pred), mask) == base
    assert mae.forward_loss(imgs, torch.where(visible, pred, pred + 5.0), mask) != base


def test_norm_pix_targets_and_zero_baseline():
    mae = tiny_mae(patch_size=4)  # n = 4 * 4 * 3 = 48 values per patch
    imgs = torch.rand(4, 3, 32, 32)
    target = mae.target(imgs)  # (4, 64, 48)
    torch.testing.assert_close(target.mean(-1), torch.zeros(4, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1, unbiased=True), torch.ones(4, 64), atol=1e-3, rtol=0)
    biased = target.var(-1, unbiased=False)
    torch.testing.assert_close(biased, torch.full((4, 64), 47 / 48), atol=1e-3, rtol=0)
    _, mask = mae.forward_encoder(imgs, 0.75)[:2]
    zero_loss = mae.forward_loss(imgs, torch.zeros_like(target), mask)
    assert zero_loss.item() == pytest.approx(47 / 48, abs=1e-3)  # the "about 1.0" trivial baseline
    plain = tiny_mae(norm_pix_loss=False, patch_size=4)
    assert torch.equal(plain.target(imgs), plain.patchify(imgs))


def test_every_trainable_parameter_gets_a_gradient():
    mae = tiny_mae()
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    loss, _, _ = mae(torch.randn(2, 3, 32, 32))
    loss.backward()
    missing = [n for n, p in mae.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing
    names = dict(mae.named_parameters())
    assert mae.no_weight_decay() <= names.keys()


def test_loss_is_float32_under_bf16_autocast():
    mae = tiny_mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = mae(torch.randn(2, 3, 32, 32))
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_encoder_keys_are_the_fine_tuning_encoder_keys():
    mae = create_mae(ModelConfig(name="vit_micro", patch_size=8),
                     MAEConfig(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4), 32)
    assert mae.encoder.state_dict().keys() == create_vit("vit_micro", 32, 8).state_dict().keys()
    assert len(mae.decoder_blocks) == 2 and mae.decoder_pred.out_features == 8 * 8 * 3
    assert all(k.startswith(("encoder.", "decoder_", "mask_token")) for k in mae.state_dict())


def test_reconstruct_pastes_visible_and_denormalises():
    mae = tiny_mae().eval()
    imgs = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    masked, pasted = mae.reconstruct(imgs, noise=noise)
    _, _, mask = mae(imgs, noise=noise)
    keep = (mask == 0)[..., None].expand(-1, -1, 192)  # (B, L, p*p*3)
    assert torch.equal(mae.patchify(pasted)[keep], mae.patchify(imgs)[keep])
    assert torch.all(mae.patchify(masked)[~keep] == 0)
    # a perfect norm-pix prediction de-normalises to the image itself
    mae.forward_decoder = lambda latent, ids_restore: mae.target(imgs)
    _, perfect = mae.reconstruct(imgs, noise=noise)
    torch.testing.assert_close(perfect, imgs, atol=1e-5, rtol=0)


def test_loss_beats_the_zero_baseline_on_smooth_images():
    # smooth images make masked patches predictable from visible ones; predicting zeros scores ~0.98
    mae = tiny_mae()
    g = torch.Generator().manual_seed(0)
    imgs = F.interpolate(torch.rand(16, 3, 2, 2, generator=g), size=32, mode="bilinear", align_corners=True)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(60):
        loss, _, _ = mae(imgs, generator=g)  # a fresh mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75
