"""Masked autoencoder for Masked Generative Pretraining (MGP), wrapping the fine-tuning encoder.

`MAE.encoder` is the very `VisionTransformer` that fine-tuning builds (encoder form of
`create_vit`), so `mae.encoder.state_dict()` is the hand-off; the decoder lives beside it.
Randomness: masking draws from `torch.rand` unless `noise` or a seeded `generator` is given.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import nn

from livt.config import MAEConfig, ModelConfig
from livt.models.vit import create_vit, init_linear_xavier, sincos_pos_embed


class MAE(nn.Module):
    """ViT encoder on the visible patches plus a light decoder that regresses all patches' pixels."""

    def __init__(
        self,
        name: str,
        img_size: int,
        patch_size: int,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = create_vit(name, img_size, patch_size, num_classes=0,
                                  drop_path_rate=drop_path_rate)
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        embed_dim = self.encoder.embed_dim
        grid = self.encoder.patch_embed.grid_size[0]
        norm_layer = partial(LayerNorm, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_embed_dim, grid)[None], requires_grad=False)  # (1, 1 + L, Dd)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_linear_xavier(module)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (tokens and position embeddings)."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patches row-major, pixels in (p, p, c) order."""
        p = self.patch_size
        return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*3) -> (B, 3, H, W), the inverse of `patchify` (square images)."""
        p = self.patch_size
        h = round(x.shape[1] ** 0.5)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)

    @staticmethod
    def random_masking(
        x: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the int(L * (1 - mask_ratio)) patches with the smallest noise, per image.

        Returns x_kept (B, K, D), mask (B, L) with 1 = removed in the original order, and
        ids_restore (B, L) such that gathering [kept, removed] with it restores the original order.
        """
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device, generator=generator)  # (B, L)
        ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: smallest noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
        ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
        x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))  # (B, K, D)
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, L)
        return x_kept, mask, ids_restore

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: (latent (B, 1 + K, D), mask (B, L), ids_restore (B, L))."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (B, L, D)
        x = x + enc.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise, generator)  # (B, K, D)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + K, D)
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch from the latent of the visible ones: (B, L, p*p*3)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - (x.shape[1] - 1), -1)  # (B, L - K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # (B, L, p*p*3), cls dropped

    @staticmethod
    def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch mean and sqrt(unbiased var + 1e-6), each (B, L, 1)."""
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
        return mean, std

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, p*p*3) in float32: pixels, or per-patch normalised pixels."""
        patches = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, std = self._patch_stats(patches)
            patches = (patches - mean) / std
        return patches

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE (mean over p*p*3), averaged over the masked patches only; float32."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            loss = (pred.float() - self.target(imgs)).pow(2).mean(dim=-1)  # (B, L)
            mask = mask.float()
            return (loss * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss (), pred (B, L, p*p*3), mask (B, L)); mask_ratio defaults to the model's."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(
        self,
        imgs: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction with the visible patches pasted in), both (B, 3, H, W).

        In the input's (normalised) pixel space; with norm_pix_loss each predicted patch is
        de-normalised with the mean / std of the true patch. Call in eval mode for a clean figure.
        """
        _, pred, mask = self(imgs, noise=noise, generator=generator)
        patches = self.patchify(imgs).float()  # (B, L, p*p*3)
        pred = pred.float()
        if self.norm_pix_loss:
            mean, std = self._patch_stats(patches)
            pred = pred * std + mean
        removed = mask[..., None]  # (B, L, 1)
        masked = self.unpatchify(patches * (1 - removed))
        pasted = self.unpatchify(patches * (1 - removed) + pred * removed)
        return masked, pasted


def create_mae(model_cfg: ModelConfig, mae_cfg: MAEConfig, img_size: int) -> MAE:
    """The MAE of the pretraining config."""
    return MAE(
        model_cfg.name, img_size, model_cfg.patch_size, mask_ratio=mae_cfg.mask_ratio,
        norm_pix_loss=mae_cfg.norm_pix_loss, decoder_embed_dim=mae_cfg.decoder_embed_dim,
        decoder_depth=mae_cfg.decoder_depth, decoder_num_heads=mae_cfg.decoder_num_heads,
        drop_path_rate=model_cfg.drop_path_rate)
