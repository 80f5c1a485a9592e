"""Hand-off weights: one `.safetensors` file per model, with its architecture and config as metadata.

Kinds: 'encoder' (pretraining encoder, timm keys with the final `norm`), 'mae' (encoder under
`encoder.` plus the decoder), 'classifier' (a ViT: timm keys with `fc_norm` and `head`; loads into
`timm.create_model('vit_*_patch16_224', num_classes=C, global_pool='avg')` as is; or a CNN of
`livt.models.cnn`: its own keys, those of timm for resnet50 / resnext50_32x4d with a linear head).
Resumable training states are Accelerate's business, not this module's.

Metadata (all strings): format_version, kind, arch (JSON; a ViT: name, embed_dim, depth, num_heads,
patch_size, img_size, num_classes, global_pool; a CNN: name, img_size, num_classes; a classifier adds
head and, for the cosine and ncm heads, head_scale), and the caller's extras as JSON (config, class_counts,
class_names, dataset, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from livt.data.errors import DataError
from livt.models import set_head
from livt.models.cnn import create_cnn, is_cnn
from livt.models.heads import build_head, head_name
from livt.models.mae import MAE
from livt.models.vit import VIT_SIZES, create_vit, resize_pos_embed, vit_size

FORMAT_VERSION = 1
KINDS = ("encoder", "mae", "classifier")
# Fields that must agree between a file and the model it is loaded into; img_size may differ
# (the position embedding is interpolated).
COMPAT_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "num_classes", "head")
# What a classifier lacks from an encoder file (REFERENCE.md section 2): fc_norm and the head
# (`head.weight`, `head.bias` for the linear head; the cosine head has no bias).
HEAD_PREFIXES = ("fc_norm.", "head.")
ENCODER_NORM_KEYS = {"norm.weight", "norm.bias"}
DECODER_PREFIXES = ("decoder_", "mask_token")
_WRAPPERS = ("module", "_orig_mod")  # DistributedDataParallel, torch.compile
_RESERVED = {"format_version", "kind", "arch"}


class CheckpointError(ValueError):
    """A weights file is missing metadata, too new, or does not fit the model; the message says which."""


# ---------------------------------------------------------------------------------------------
# Files


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` (DDP) and `_orig_mod.` (torch.compile) from the keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        while parts and parts[0] in _WRAPPERS:
            parts.pop(0)
        clean = ".".join(p for p in parts if p != "_orig_mod")
        if clean in out:
            raise CheckpointError(f"two keys map to '{clean}' once wrapper prefixes are removed")
        out[clean] = value
    return out


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """safetensors `save_file` to a temp file beside `path`, fsync, then rename onto `path`.

    A crash mid-write leaves any previous file at `path` intact.
    """
    bad = [k for k in tensors if k.split(".")[0] in _WRAPPERS or "_orig_mod" in k.split(".")]
    if bad:
        raise CheckpointError(f"keys carry wrapper prefixes (module. / _orig_mod.): {bad[:5]}")
    not_str = [k for k, v in metadata.items() if not isinstance(v, str)]
    if not_str:
        raise CheckpointError(f"metadata values must be strings: {not_str}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_file_with_meta(
    path: str | Path, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a livt file; meta has format_version (int), kind, arch and the extras."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        hint = " (an official .pth? convert it with livt.checkpoint.import_official)" \
            if path.suffix in (".pth", ".pt") else ""
        raise CheckpointError(f"{path}: not a safetensors file{hint}: {e}") from None
    if "format_version" not in raw or "kind" not in raw or "arch" not in raw:
        raise CheckpointError(f"{path}: no livt metadata (format_version, kind, arch); "
                              "not written by livt.checkpoint.save_model")
    version = int(raw["format_version"])
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this livt reads "
                              f"({FORMAT_VERSION}); update livt")
    meta: dict[str, Any] = {"format_version": version, "kind": raw["kind"]}
    for key, value in raw.items():
        if key not in meta:
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata '{key}' is not valid JSON") from None
    return state, meta


def save_model(model: nn.Module, path: str | Path, kind: str, arch: dict[str, Any] | None = None,
               **extra: Any) -> None:
    """Write `model`'s weights with livt metadata; extras are stored as JSON.

    kind 'encoder' accepts the encoder or its MAE (the encoder is saved), 'classifier' a ViT or a CNN
    classifier. `arch` defaults to `arch_of(model)`; a given arch must agree with the model on the
    fields they share.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind '{kind}'; choose one of {', '.join(KINDS)}")
    clash = _RESERVED & extra.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved")
    model = _unwrap(model)
    if kind == "encoder" and isinstance(model, MAE):
        model = model.encoder
    expected = MAE if kind == "mae" else VisionTransformer
    composite = kind == "classifier" and isinstance(getattr(model, "arch", None), dict)  # livt.models.MODULES
    if not (isinstance(model, expected) or composite or (kind == "classifier" and is_cnn(model))):
        also = " or a livt CNN" if kind == "classifier" else ""
        raise CheckpointError(f"kind '{kind}' needs a {expected.__name__}{also}, got {type(model).__name__}")
    stored = arch_of(model)
    differ = {k: v for k, v in (arch or {}).items() if k in stored and stored[k] != v}
    if differ:
        raise CheckpointError("save_model: the given arch disagrees with the model on "
                              + ", ".join(f"{k}: {v} vs model {stored[k]}" for k, v in differ.items()))
    metadata = {"format_version": str(FORMAT_VERSION), "kind": kind,
                "arch": json.dumps({**(arch or {}), **stored})}
    for key, value in extra.items():
        try:
            metadata[key] = json.dumps(value)
        except TypeError as e:
            raise CheckpointError(f"metadata '{key}' is not JSON-serialisable: {e}") from None
    atomic_save_file(strip_wrapper_prefixes(model.state_dict()), path, metadata)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---------------------------------------------------------------------------------------------
# Architecture


def _size_name(embed_dim: int, depth: int, num_heads: int) -> str:
    for name, size in VIT_SIZES.items():
        if size == (embed_dim, depth, num_heads):
            return name
    raise CheckpointError(f"no livt ViT size has embed_dim {embed_dim}, depth {depth}, heads "
                          f"{num_heads}; known: {VIT_SIZES}")


def arch_of(model_or_meta: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The arch dict of a model (ViT, MAE or CNN), of a file's meta, or an arch dict itself."""
    if isinstance(model_or_meta, dict):
        return dict(model_or_meta.get("arch", model_or_meta))
    model = _unwrap(model_or_meta)
    if isinstance(getattr(model, "arch", None), dict):  # a livt.models.MODULES model (ResLT, SADE)
        return dict(model.arch)
    if isinstance(model, MAE):
        blocks = model.decoder_blocks
        return {**arch_of(model.encoder), "decoder_embed_dim": model.decoder_embed.out_features,
                "decoder_depth": len(blocks), "decoder_num_heads": blocks[0].attn.num_heads}
    if is_cnn(model):
        arch = {"name": model.cnn_name, "img_size": model.img_size, "num_classes": model.num_classes}
    elif isinstance(model, VisionTransformer):
        depth, num_heads = len(model.blocks), model.blocks[0].attn.num_heads
        arch = {"name": _size_name(model.embed_dim, depth, num_heads), "embed_dim": model.embed_dim,
                "depth": depth, "num_heads": num_heads, "patch_size": model.patch_embed.patch_size[0],
                "img_size": model.patch_embed.img_size[0], "num_classes": model.num_classes,
                "global_pool": model.global_pool}
    else:
        raise TypeError(f"arch_of: expected a VisionTransformer, MAE, livt CNN or dict, got {type(model).__name__}")
    if model.num_classes:
        head = model.get_classifier()
        arch["head"] = head_name(head)
        if arch["head"] != "linear":
            arch["head_scale"] = head.scale
    return arch


def check_compatible(meta_arch: dict[str, Any], wanted_arch: dict[str, Any], what: str) -> None:
    """Raise CheckpointError listing every field of COMPAT_FIELDS (present in both) that differs."""
    differ = [f"{k}: file {meta_arch[k]} vs config {wanted_arch[k]}" for k in COMPAT_FIELDS
              if k in meta_arch and k in wanted_arch and meta_arch[k] != wanted_arch[k]]
    if differ:
        raise CheckpointError(f"{what}: made for another architecture: " + "; ".join(differ))


# ---------------------------------------------------------------------------------------------
# Loading


def encoder_state(state: dict[str, torch.Tensor], kind: str, path: Path) -> dict[str, torch.Tensor]:
    """Encoder keys of an encoder or MAE state dict (decoder and mask token dropped)."""
    if kind == "encoder":
        return state
    if kind != "mae":
        raise CheckpointError(f"{path}: kind '{kind}' is not an encoder or MAE file")
    stray = [k for k in state if not k.startswith(("encoder.",) + DECODER_PREFIXES)]
    if stray:
        raise CheckpointError(f"{path}: MAE file has keys outside encoder./decoder: {stray}")
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def load_encoder(classifier: VisionTransformer, path: str | Path) -> Any:
    """Load an encoder or MAE file into a fresh classifier; returns (missing_keys, unexpected_keys).

    The position embedding is interpolated when the grid differs. Only fc_norm and head may stay
    missing, only the encoder's final norm may be left over; anything else is a CheckpointError.
    """
    path = Path(path)
    if not isinstance(_unwrap(classifier), VisionTransformer):
        raise CheckpointError(f"load_encoder({path}): pretrained encoders are ViTs; a "
                              f"{type(classifier).__name__} trains from scratch")
    state, meta = load_file_with_meta(path)
    state = encoder_state(strip_wrapper_prefixes(state), meta["kind"], path)
    wanted = {k: v for k, v in arch_of(classifier).items() if k != "num_classes"}
    check_compatible(meta["arch"], wanted, f"load_encoder({path})")
    grid = classifier.patch_embed.grid_size[0]
    if "pos_embed" in state and state["pos_embed"].shape != classifier.pos_embed.shape:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid)  # (1, 1 + grid**2, D)

    own = set(classifier.state_dict())
    head_keys = {k for k in own if k.startswith(HEAD_PREFIXES)}
    missing, unexpected = own - state.keys(), state.keys() - own
    if missing != head_keys or unexpected != ENCODER_NORM_KEYS:
        problems = []
        checks = (("missing", missing, head_keys), ("unexpected", unexpected, ENCODER_NORM_KEYS))
        for label, got, allowed in checks:
            if got - allowed:
                problems.append(f"{label} keys not allowed: {sorted(got - allowed)}")
            if allowed - got:
                problems.append(f"expected {label} keys absent: {sorted(allowed - got)}")
        raise CheckpointError(f"load_encoder({path}): " + "; ".join(problems))
    return classifier.load_state_dict(state, strict=False)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier (ViT or CNN) from a 'classifier' file's arch metadata; returns (model in eval
    mode, meta)."""
    state, meta = load_file_with_meta(path)
    if meta["kind"] != "classifier":
        raise CheckpointError(f"{path}: kind '{meta['kind']}', expected a classifier file")
    arch = meta["arch"]
    from livt.models import MODULES, build_classifier

    if arch.get("head") in MODULES:
        model = build_classifier(arch["name"], arch["img_size"], arch.get("patch_size", 0), arch["num_classes"],
                                 head=arch["head"])
        model.load_state_dict(strip_wrapper_prefixes(state))
        return model.to(device).eval(), meta
    if is_cnn(arch["name"]):
        model = create_cnn(arch["name"], arch["img_size"], arch["num_classes"])
    else:
        model = create_vit(arch["name"], arch["img_size"], arch["patch_size"], num_classes=arch["num_classes"],
                           global_pool=arch["global_pool"])
    if arch.get("head", "linear") != "linear":
        set_head(model, build_head(arch["head"], model.num_features, arch["num_classes"],
                                   arch.get("head_scale", 30.0)))
    check_compatible(arch, arch_of(model), f"load_classifier({path})")
    model.load_state_dict(strip_wrapper_prefixes(state))
    return model.to(device).eval(), meta


def check_pretrained_matches(meta: dict, dataset_name: str, counts: np.ndarray, path: str,
                             val_from_train: float = 0.0) -> None:
    """A pretraining file made on this same dataset must have seen the same classes (the same counts,
    unless one of the stages carved a val split from train)."""
    if meta.get("dataset") != dataset_name or meta.get("class_counts") is None:
        return
    pre = np.asarray(meta["class_counts"])
    same_carve = meta.get("config", {}).get("data", {}).get("val_from_train", 0.0) == val_from_train
    if len(pre) != len(counts) or (same_carve and not np.array_equal(pre, counts)):
        raise DataError(
            f"{path} was pretrained on '{dataset_name}' with {len(pre)} classes "
            f"({int(pre.sum())} images), but the fine-tuning data '{dataset_name}' has {len(counts)} classes "
            f"({int(counts.sum())} images): the split files or --data settings differ between the stages")


# ---------------------------------------------------------------------------------------------
# Official checkpoints


def _read_official(src: Path) -> dict[str, torch.Tensor]:
    if not src.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {src}")
    try:
        # argparse.Namespace is the `args` entry of the official training checkpoints: plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{src}: refusing to unpickle it: it holds objects other than tensors and plain data "
            f"(torch.load weights_only=True failed: {str(e).splitlines()[-1][:200]})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a 'model' state dict of tensors")
    return strip_wrapper_prefixes(state)


def _infer_arch(enc: dict[str, torch.Tensor], src: Path) -> dict[str, Any]:
    """The encoder's arch from tensor shapes (pos_embed, patch_embed, blocks, head)."""
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if key not in enc:
            raise CheckpointError(f"{src}: no '{key}'; not an MAE / LiVT ViT checkpoint")
    embed_dim = enc["pos_embed"].shape[-1]
    grid = round((enc["pos_embed"].shape[1] - 1) ** 0.5)
    patch_size = enc["patch_embed.proj.weight"].shape[-1]
    depth = len({int(m.group(1)) for k in enc if (m := re.match(r"blocks\.(\d+)\.", k))})
    by_width = {size[0]: name for name, size in VIT_SIZES.items()}
    if embed_dim not in by_width:
        raise CheckpointError(f"{src}: embed_dim {embed_dim} matches no livt ViT size {VIT_SIZES}")
    name = _size_name(embed_dim, depth, vit_size(by_width[embed_dim])[2])
    num_classes = enc["head.weight"].shape[0] if "head.weight" in enc else 0
    return {"name": name, "embed_dim": embed_dim, "depth": depth, "num_heads": VIT_SIZES[name][2],
            "patch_size": patch_size, "img_size": grid * patch_size, "num_classes": num_classes,
            "global_pool": "avg" if "fc_norm.weight" in enc else "token"}


def import_official(src_pth: str | Path, dst_safetensors: str | Path, kind: str) -> dict[str, Any]:
    """Convert an official MAE (pretraining) or LiVT (fine-tuned) `.pth` into a livt file; returns its arch.

    kind 'mae' (encoder + decoder), 'encoder' (the encoder of either MAE file), 'classifier'
    (fine-tuned: keys are timm's already). The arch is inferred from the tensor shapes and the
    result is checked key by key against the livt model of that arch.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind '{kind}'; choose one of {', '.join(KINDS)}")
    src = Path(src_pth)
    state = _read_official(src)
    decoder = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
    enc = {k: v for k, v in state.items() if k not in decoder}
    arch = _infer_arch(enc, src)
    if kind == "mae":
        if not decoder:
            raise CheckpointError(f"{src}: no decoder keys; import it as kind 'encoder'")
        # head counts do not show in the shapes; the official decoder always has 16
        dec_depth = len({int(m.group(1)) for k in decoder if (m := re.match(r"decoder_blocks\.(\d+)\.", k))})
        arch.update(decoder_embed_dim=decoder["decoder_embed.weight"].shape[0], decoder_depth=dec_depth,
                    decoder_num_heads=16)
        out = {**{f"encoder.{k}": v for k, v in enc.items()}, **decoder}
    else:
        out = enc
    if (kind == "classifier") != (arch["num_classes"] > 0):
        has = "has" if arch["num_classes"] else "lacks"
        raise CheckpointError(f"{src}: kind '{kind}' but the file {has} a classification head")

    with torch.device("meta"):
        if kind == "mae":
            reference = MAE(arch["name"], arch["img_size"], arch["patch_size"],
                            decoder_embed_dim=arch["decoder_embed_dim"], decoder_depth=arch["decoder_depth"],
                            decoder_num_heads=arch["decoder_num_heads"])
        else:
            reference = create_vit(arch["name"], arch["img_size"], arch["patch_size"],
                                   num_classes=arch["num_classes"], global_pool=arch["global_pool"])
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise CheckpointError(f"{src}: does not match a livt {arch['name']} {kind}: keys or shapes differ "
                              f"at {diff[:10]}")
    atomic_save_file(out, dst_safetensors, {"format_version": str(FORMAT_VERSION), "kind": kind,
                                            "arch": json.dumps(arch), "source": json.dumps(src.name)})
    return arch
