"""livt classifiers as plain timm models.

    from livt.export import timm_model
    model = timm_model("checkpoints/finetune-.../classifier.safetensors")  # timm VisionTransformer, eval mode
    import timm.data
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))  # livt's eval crop

Every fine-tuned classifier file carries a `pretrained_cfg` metadata entry in timm's vocabulary:
`model_args` (the `timm.models.vision_transformer.VisionTransformer` keyword arguments: img_size,
patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, class_token, global_pool, num_classes),
`architecture` (timm's registered name of that ViT size; vit_micro has none), input_size, mean / std,
crop_pct (= data.eval_crop), crop_mode and interpolation. With timm alone:

    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    with safe_open(path, "pt") as f:
        args = json.loads(f.metadata()["pretrained_cfg"])["model_args"]
    model = VisionTransformer(**args); model.load_state_dict(load_file(path))

Classifiers whose head is not timm's linear head (the cosine head, later multi-branch heads) and
backbones timm lacks load through livt's own constructor, `livt.checkpoint.load_classifier(path)`;
`timm_model` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from livt.checkpoint import CheckpointError, arch_of, load_file_with_meta, strip_wrapper_prefixes

# livt ViT size -> timm's registered model of the same size (the size arguments are stored explicitly)
TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def timm_model_args(model: VisionTransformer) -> dict[str, Any]:
    """The VisionTransformer keyword arguments that rebuild `model`'s architecture, read from the model."""
    arch = arch_of(model)
    block = model.blocks[0]
    return {"img_size": arch["img_size"], "patch_size": arch["patch_size"], "embed_dim": arch["embed_dim"],
            "depth": arch["depth"], "num_heads": arch["num_heads"],
            "mlp_ratio": block.mlp.fc1.out_features / arch["embed_dim"],
            "qkv_bias": block.attn.qkv.bias is not None, "class_token": model.cls_token is not None,
            "global_pool": arch["global_pool"], "num_classes": arch["num_classes"]}


def pretrained_cfg(model: nn.Module, img_size: int, mean: tuple, std: tuple, eval_crop: float) -> dict[str, Any]:
    """timm's `pretrained_cfg` of a classifier and its evaluation transform (stored with the weights).

    `model_args` and `architecture` only for a timm VisionTransformer (None otherwise)."""
    vit = isinstance(model, VisionTransformer)
    arch = arch_of(model) if vit else {}
    return {"architecture": TIMM_NAMES.get(arch.get("name")), "model_args": timm_model_args(model) if vit else None,
            "num_classes": getattr(model, "num_classes", None), "input_size": [3, img_size, img_size],
            "mean": list(mean), "std": list(std), "crop_pct": eval_crop, "crop_mode": "center",
            "interpolation": "bicubic", "classifier": "head" if vit else None}


def timm_model(path: str | Path) -> VisionTransformer:
    """The timm VisionTransformer of a livt classifier file, its weights loaded (strict), in eval mode, with
    `pretrained_cfg` set (so `timm.data.resolve_data_config(model=model)` gives livt's eval transform).

    CheckpointError naming the head or backbone (and `livt.checkpoint.load_classifier`) when the file is
    not a plain timm ViT with a linear head.
    """
    state, meta = load_file_with_meta(path)
    if meta["kind"] != "classifier":
        raise CheckpointError(f"{path}: kind '{meta['kind']}', timm_model needs a fine-tuned classifier file")
    arch = meta["arch"]
    head = arch.get("head", "linear")
    if head != "linear":
        raise CheckpointError(
            f"{path}: its '{head}' head does not fold into timm's linear head; load it with livt's constructor: "
            f"livt.checkpoint.load_classifier({str(path)!r})")
    cfg = meta.get("pretrained_cfg") or {}
    if not cfg.get("model_args"):
        raise CheckpointError(
            f"{path}: backbone '{arch.get('name')}' has no timm architecture stored (no pretrained_cfg "
            f"model_args); load it with livt.checkpoint.load_classifier({str(path)!r})")
    model = VisionTransformer(**cfg["model_args"], weight_init="skip")  # the weights are loaded next
    model.load_state_dict(strip_wrapper_prefixes(state))
    # timm's pretrained_cfg holds tuples (JSON gave lists)
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "model_args"}
    return model.eval()


__all__ = ["TIMM_NAMES", "pretrained_cfg", "timm_model", "timm_model_args"]
