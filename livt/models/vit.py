"""ViT encoder and classifier: timm's `VisionTransformer` with the LiVT (MAE) initialisation.

One builder, two forms:
- the pretraining ENCODER (`num_classes=0`, global_pool 'token' or ''): keeps the final `norm`, its
  fixed 2-D sin-cos position embedding is frozen;
- the fine-tuning CLASSIFIER (`num_classes=C`, global_pool 'avg'): timm then replaces `norm` by
  Identity and adds `fc_norm` after averaging the patch tokens (cls token excluded); the position
  embedding starts as the same sin-cos table but is learnable.
The state dicts are timm's, so a fine-tuned file loads into `timm.create_model('vit_*', ...)`.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# name -> (embed_dim, depth, num_heads). vit_micro is the CPU / test preset (32 px, patch 4 or 8).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_micro": (128, 4, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


def vit_size(name: str) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of a named size; ValueError listing the valid names."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT size '{name}'; choose one of {', '.join(VIT_SIZES)}")
    return VIT_SIZES[name]


def sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (1 + grid_size**2, D) float32 (cls row zero, first).

    Patches are in row-major order; the first D/2 channels encode the column, the last D/2 the row,
    each half [sin(p * w), cos(p * w)] with w_i = 1 / 10000**(i / k), k = D / 4.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    k = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)  # (k,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (G, G) each

    def encode(p: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, D/2)
        angles = p[:, None] * omega[None, :]  # (L, k)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols.flatten()), encode(rows.flatten())], dim=1)  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)  # (1 + L, D)
    return emb.float()


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubically resample the patch part of a (1, 1 + L, D) position embedding to new_grid**2 patches.

    The cls row is kept. Plain bicubic (no antialias): timm's default antialias=True switches to a
    different cubic kernel even when upsampling.
    """
    grid = round((pos_embed.shape[1] - 1) ** 0.5)
    if grid * grid != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} is not 1 cls row + a square grid")
    return resample_abs_pos_embed(
        pos_embed, new_size=[new_grid, new_grid], old_size=[grid, grid], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False)  # (1, 1 + new_grid**2, D)


@torch.no_grad()
def init_linear_xavier(module: nn.Module) -> None:
    """xavier_uniform weights and zero biases for every Linear; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _init_vit(model: VisionTransformer) -> None:
    grid = model.patch_embed.grid_size[0]
    model.pos_embed.copy_(sincos_pos_embed(model.embed_dim, grid)[None])  # (1, 1 + L, D)
    nn.init.normal_(model.cls_token, std=0.02)
    init_linear_xavier(model)
    # the patch-embed conv is a Linear on flattened (c, p, p) patches; its bias keeps PyTorch's default
    # Conv2d init, uniform(+-1/sqrt(fan_in)), as the official MAE does (its init touches the weight only)
    proj = model.patch_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)


def create_vit(
    name: str,
    img_size: int,
    patch_size: int,
    num_classes: int = 0,
    drop_path_rate: float = 0.0,
    global_pool: str | None = None,
) -> VisionTransformer:
    """Build the encoder (num_classes=0) or the classifier (num_classes=C) of a named size.

    global_pool defaults to 'avg' for a classifier and 'token' for the encoder. The position
    embedding is frozen in the encoder (MAE pretraining), learnable in a classifier.
    """
    embed_dim, depth, num_heads = vit_size(name)
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if global_pool is None:
        global_pool = "avg" if num_classes > 0 else "token"
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=num_classes, global_pool=global_pool,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
        class_token=True, drop_path_rate=drop_path_rate,
        weight_init="skip",  # replaced by the MAE init below
    )
    _init_vit(model)
    model.pos_embed.requires_grad_(num_classes > 0)
    return model
