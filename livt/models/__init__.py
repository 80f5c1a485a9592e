"""Models: backbones (one plain dict `BACKBONES`: the ViT sizes and the CNNs of `livt.models.cnn`),
heads (`livt.models.heads.HEADS`), the MAE, and the one model-output convention of fine-tuning.

Every classifier livt builds is a timm-style model: `forward_features(x)`, `forward_head(x,
pre_logits=True)` -> pooled features (B, D), `get_classifier()` -> its head, and `forward(x)` ->
logits (B, C), which is all that prediction, evaluation and export use. Training asks for more through
`outputs(model, x)`: a dict with `logits` (B, C), `features` (B, D, the classifier's input) and whatever
the head adds (`cosine`, ...). A model with several outputs of its own (branches, experts) defines
`forward_outputs(x) -> dict` instead. Losses name the entries they need (`livt.losses`).

`MODULES` holds the heads that restructure the whole model around the backbone (ResLT's branches,
SADE's experts), chosen by the same `model.head` key as `HEADS`; such a model carries `arch`, the
build_classifier arguments that rebuild it (what `livt.checkpoint` stores).
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models.vision_transformer import Block
from torch import nn

from livt.models.adapter import Adapter, batchnorms, forward_features, outputs, pre_logits
from livt.models.cnn import CNNS, create_cnn, is_cnn
from livt.models.heads import HEADS, build_head, head_name
from livt.models.mae import MAE, create_mae
from livt.models.reslt import ResLTClassifier
from livt.models.sade import SADEClassifier
from livt.models.vit import VIT_SIZES, create_vit, resize_pos_embed, sincos_pos_embed, vit_size


def _vit(name: str) -> Callable[..., nn.Module]:
    def build(img_size: int, patch_size: int, num_classes: int, drop_path_rate: float = 0.0) -> nn.Module:
        return create_vit(name, img_size, patch_size, num_classes=num_classes, drop_path_rate=drop_path_rate,
                          global_pool="avg")
    return build


def _cnn(name: str) -> Callable[..., nn.Module]:
    def build(img_size: int, patch_size: int, num_classes: int, drop_path_rate: float = 0.0, **widths) -> nn.Module:
        return create_cnn(name, img_size, num_classes, drop_path_rate, **widths)  # no patches: patch_size unused
    return build


# name -> builder(img_size, patch_size, num_classes, drop_path_rate) of a classifier with a linear head
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _vit(name) for name in VIT_SIZES},
    **{name: _cnn(name) for name in CNNS},
}


# head name -> model class built from a backbone builder (no arguments, or a CNN's stage widths)
MODULES: dict[str, Callable[[Callable[[], nn.Module]], nn.Module]] = {
    "reslt": ResLTClassifier,
    "sade": SADEClassifier,
}


def set_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """Replace the classifier head of a timm-style model (`head` of a ViT, `fc` of a ResNet)."""
    attr = "head" if isinstance(getattr(model, "head", None), nn.Module) else "fc"
    setattr(model, attr, head)
    return model


def build_classifier(name: str, img_size: int, patch_size: int, num_classes: int, drop_path_rate: float = 0.0,
                     head: str = "linear", head_scale: float = 30.0) -> nn.Module:
    """The named backbone with the named head (`linear` keeps the backbone's own initialisation)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    if head not in HEADS and head not in MODULES:
        raise ValueError(f"unknown head '{head}'; choose one of {', '.join([*HEADS, *MODULES])}")
    if head in MODULES:
        model = MODULES[head](lambda **widths: BACKBONES[name](img_size, patch_size, num_classes, drop_path_rate,
                                                                **widths))
        model.arch = {"name": name, "img_size": img_size, "patch_size": patch_size, "num_classes": num_classes,
                      "head": head}
        return model
    model = BACKBONES[name](img_size, patch_size, num_classes, drop_path_rate)
    if head != "linear":
        set_head(model, build_head(head, model.num_features, num_classes, head_scale))
    return model


def build_model(cfg, num_classes: int) -> nn.Module:
    """The classifier of a fine-tuning config (`cfg.model`, `cfg.data.img_size`)."""
    m = cfg.model
    return build_classifier(m.name, cfg.data.img_size, m.patch_size, num_classes, m.drop_path_rate, m.head,
                            m.head_scale)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile the repeated blocks of `model` in place (regional compilation: each distinct block is
    compiled once and reused, so compiling takes seconds, not minutes); the whole model when it has none.
    Compiled in place, the state dict keeps its keys (no `_orig_mod.`). Returns the blocks compiled."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks or [model]:
        block.compile()
    return len(blocks)


__all__ = ["BACKBONES", "CNNS", "HEADS", "MAE", "MODULES", "VIT_SIZES", "Adapter", "batchnorms", "build_classifier",
           "build_head", "compile_blocks", "create_cnn", "create_mae", "create_vit", "forward_features", "head_name",
           "is_cnn", "outputs", "pre_logits", "resize_pos_embed", "set_head", "sincos_pos_embed", "vit_size"]
