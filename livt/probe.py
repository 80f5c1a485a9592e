"""What an encoder has learned, without fine-tuning it: weighted kNN and linear probing on frozen features.

    livt probe checkpoints/<pretrain run>/encoder.safetensors --data demo    # a pretrained encoder (or MAE file)
    livt probe random --data demo                                            # random initialisation, seed --seed
    livt probe checkpoints/<finetune run>/classifier.safetensors --data demo  # a fine-tuned classifier's backbone

Features of the long-tailed train split are the bank / training set; accuracy is reported on the val split
(never the test split where it is held out, since probes are used to choose) with the shot groups, for two
features: `cls` (the class token after the encoder's final norm) and `mean` (the mean of the patch tokens;
through fc_norm for a classifier that pools that way). Prints a table and writes a JSON file (`--out`).

- kNN (DINO's protocol): cosine similarity of L2-normalised features, the k = 20 nearest train features vote
  for their class with weight exp(sim / 0.07), the class with the largest vote sum wins.
- linear probe (MAE's protocol, on features cached once, no augmentation): BatchNorm without affine
  parameters, then a linear layer trained with cross-entropy, no weight decay; SGD with momentum and a cosine
  schedule instead of MAE's LARS (which matters at its batch of 16,384, not here). On a long-tailed train
  split both kNN and that probe lean to the head classes; a second linear probe trained with Bal-CE (the
  logits shifted by the log prior in training only) reads the same features class-balanced.

`monitor` is the kNN probe that pretraining runs every `monitor.every` epochs on capped subsets
(`livt.pretrain`). Nothing here touches the global random streams: subsets and the probe head draw from
their own generators, and the data loader owns its generator, so a monitored run trains bit for bit like an
unmonitored one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from livt import config as config_lib
from livt import engine
from livt.checkpoint import (
    CheckpointError,
    encoder_state,
    load_classifier,
    load_file_with_meta,
    strip_wrapper_prefixes,
)
from livt.data import build_dataset, heldout_val, resolve_normalization
from livt.data.loading import Augmented
from livt.data.splits import LTDataset, SubsetDataset, class_counts
from livt.data.stats import describe
from livt.data.transforms import eval_transform
from livt.losses import build_loss
from livt.metrics import evaluate_logits
from livt.models.vit import create_vit

KNN_K = 20
KNN_T = 0.07
FEATURES = ("cls", "mean")
GROUPS = ("top1", "many", "medium", "few")
LINEAR_EPOCHS = 100
LINEAR_BATCH = 256
LINEAR_LR = 0.1
LINEAR_LOSSES = ("ce", "bal_ce")  # MAE's probe, and the same head trained through the prior (Bal-CE)


class TokenFeatures(nn.Module):
    """(B, 3, H, W) -> (B, 2 D): the `cls` and `mean` features of a ViT side by side (one forward for both)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.vit.forward_features(images)  # (B, 1 + L, D), after the final norm of an encoder
        cls = tokens[:, 0]
        mean = self.vit.fc_norm(tokens[:, self.vit.num_prefix_tokens:].mean(1))  # fc_norm: Identity in an encoder
        return torch.cat([cls, mean], dim=1)


def split_features(both: Tensor) -> dict[str, Tensor]:
    d = both.shape[1] // 2
    return {"cls": both[:, :d], "mean": both[:, d:]}


def load_vit(encoder: str, cfg: config_lib.PretrainConfig) -> VisionTransformer:
    """The ViT of `encoder`: 'random' (cfg.model at cfg.data.img_size, initialised from cfg.seed), an encoder
    or MAE file from `livt pretrain`, or a classifier file from `livt finetune` (its backbone)."""
    if encoder == "random":
        engine.seed_step(cfg.seed, -1, 0)  # the initialisation a run of this seed starts from
        return create_vit(cfg.model.name, cfg.data.img_size, cfg.model.patch_size, num_classes=0)
    if not Path(encoder).is_file():
        raise config_lib.ConfigError(f"livt probe: '{encoder}' is neither 'random' nor a .safetensors file")
    state, meta = load_file_with_meta(encoder)
    if meta["kind"] == "classifier":
        model, _ = load_classifier(encoder)
        if not isinstance(model, VisionTransformer):
            raise CheckpointError(f"{encoder}: the probe reads ViT tokens; this classifier is a "
                                  f"{type(model).__name__}")
        return model
    arch = meta["arch"]
    if arch["img_size"] != cfg.data.img_size:
        raise config_lib.ConfigError(f"{encoder} was trained at {arch['img_size']} px, --data.img_size is "
                                     f"{cfg.data.img_size}: probe it at its own size")
    vit = create_vit(arch["name"], arch["img_size"], arch["patch_size"], num_classes=0)
    vit.load_state_dict(encoder_state(strip_wrapper_prefixes(state), meta["kind"], Path(encoder)))
    return vit


@torch.no_grad()
def extract(accelerator, vit: VisionTransformer, dataset: LTDataset, cfg: Any) -> tuple[dict[str, Tensor], Tensor]:
    """({'cls', 'mean'} -> (N, D) float32 CPU features, (N,) labels) of `dataset` through the evaluation
    transform; the model is left in eval mode."""
    d = cfg.data
    data = Augmented(dataset, eval_transform(d.img_size, d.mean, d.std, d.eval_crop), cfg.seed, d.skip_bad_images)
    both, labels = engine.predict(accelerator, TokenFeatures(vit), data, d.batch_size, d.num_workers)
    return split_features(both), labels


def knn_scores(train: Tensor, train_labels: Tensor, query: Tensor, num_classes: int, k: int = KNN_K,
               temperature: float = KNN_T, chunk: int = 1024) -> Tensor:
    """(Q, C) vote sums of the weighted kNN classifier: each query's k most cosine-similar train features
    vote for their class with weight exp(sim / temperature)."""
    train = F.normalize(train.float(), dim=1)
    k = min(k, len(train))
    out = []
    for q in F.normalize(query.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(q), num_classes)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def linear_probe_logits(train: Tensor, train_labels: Tensor, query: Tensor, counts: np.ndarray, loss: str = "ce",
                        seed: int = 0, epochs: int = LINEAR_EPOCHS, batch_size: int = LINEAR_BATCH,
                        lr: float = LINEAR_LR) -> Tensor:
    """(Q, C) logits of a BatchNorm (no affine) + linear head trained on cached features with the named loss of
    `livt.losses` (MAE: 'ce'; 'bal_ce' trains through the training prior, so the head is not pulled to the
    head classes: a class-balanced reading of the same features)."""
    num_classes = len(counts)
    criterion = build_loss(loss, counts)
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6)
    head = nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g).clamp_(-2, 2) * 0.01)  # MAE: trunc_normal 0.01
        head.bias.zero_()
    probe = nn.Sequential(bn, head)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    probe.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            optimizer.zero_grad(set_to_none=True)
            criterion(probe(train[idx]), train_labels[idx]).backward()
            optimizer.step()
            scheduler.step()
    probe.eval()
    with torch.no_grad():
        return probe(query)


def accuracy(scores: Tensor, labels: Tensor, counts: np.ndarray) -> dict[str, float | None]:
    """top-1 and the shot groups (percent) of (N, C) scores, through `livt.metrics.evaluate_logits`."""
    probs = scores / scores.sum(1, keepdim=True).clamp_min(1e-30) if (scores >= 0).all() else scores
    results = evaluate_logits(probs, labels, counts)
    return {g: results[g] for g in GROUPS}


def capped(dataset: LTDataset, cap: int, seed: int) -> LTDataset:
    """At most `cap` images of `dataset`, a fixed random subset (a private generator; 0 = all)."""
    if not cap or len(dataset) <= cap:
        return dataset
    keep = np.sort(np.random.default_rng([seed, cap]).permutation(len(dataset))[:cap])
    return SubsetDataset(dataset, keep, f"{dataset.name} ({cap} of {len(dataset)})")


@torch.no_grad()
def monitor(accelerator, vit: VisionTransformer, train: LTDataset, val: LTDataset, counts: np.ndarray,
            cfg: config_lib.PretrainConfig) -> dict[str, float]:
    """The kNN top-1 (percent) of both features on capped subsets: what pretraining logs every monitor.every
    epochs. Runs inside `torch.random.fork_rng`, so the global random streams are as they were."""
    m = cfg.monitor
    was_training = vit.training
    with torch.random.fork_rng(devices=[]):
        feats, labels = extract(accelerator, vit, capped(train, m.max_train, cfg.seed), cfg)
        vfeats, vlabels = extract(accelerator, vit, capped(val, m.max_val, cfg.seed), cfg)
    vit.train(was_training)
    row = {}
    for name in FEATURES:
        scores = knn_scores(feats[name], labels, vfeats[name], len(counts), m.k, m.temperature)
        row.update({f"knn_{name}_{g}": v for g, v in accuracy(scores, vlabels, counts).items() if v is not None})
    return row


def probe(vit: VisionTransformer, cfg: config_lib.PretrainConfig, linear: bool = True) -> dict[str, Any]:
    """kNN and linear-probe accuracy of both features, trained on train, reported on val."""
    accelerator = engine.make_accelerator(cfg.precision)
    vit.to(accelerator.device)
    d = cfg.data
    train, val, test = (build_dataset(d, split) for split in ("train", "val", "test"))
    counts = class_counts(train.targets, train.num_classes)
    accelerator.print(describe(counts, train.name))
    feats, labels = extract(accelerator, vit, train, cfg)
    vfeats, vlabels = extract(accelerator, vit, val, cfg)
    rows = []
    for name in FEATURES:
        scores = knn_scores(feats[name], labels, vfeats[name], len(counts), cfg.monitor.k, cfg.monitor.temperature)
        rows.append({"probe": f"knn k={cfg.monitor.k}", "feature": name, **accuracy(scores, vlabels, counts)})
        for loss in LINEAR_LOSSES if linear else ():
            logits = linear_probe_logits(feats[name], labels, vfeats[name], counts, loss, cfg.seed)
            rows.append({"probe": f"linear {loss}", "feature": name, **accuracy(logits, vlabels, counts)})
    evaluated_on = f"{val.name} ({len(val)} images)" + ("" if heldout_val(val, test) else
                                                         ": the test split (no held-out val)")
    return {"rows": rows, "train": f"{train.name} ({len(train)} images)", "val": evaluated_on,
            "knn": {"k": cfg.monitor.k, "temperature": cfg.monitor.temperature},
            "linear": {"epochs": LINEAR_EPOCHS, "batch_size": LINEAR_BATCH, "lr": LINEAR_LR}}


def table(results: dict[str, Any]) -> str:
    show = lambda v: "n/a" if v is None else f"{v:.1f}"
    lines = ["| probe | feature | top-1 | many | medium | few |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['feature']} | " + " | ".join(show(r[g]) for g in GROUPS) + " |"
              for r in results["rows"]]
    return "\n".join(lines)


USAGE = """usage: livt probe ENCODER [--out FILE.json] [--no_linear] [--data PRESET] [--key value ...]

ENCODER: encoder.safetensors / mae.safetensors (livt pretrain), classifier.safetensors (livt finetune: its
backbone), or 'random' (--model.name at --data.img_size, initialised from --seed). The other options are
`livt pretrain`'s (data, model, seed, monitor.k, monitor.temperature); see livt pretrain --help.
--out: the JSON file (default: ENCODER with .probe.json, or <output_dir>/probe-random-<dataset>-seed<seed>.json)."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    encoder, rest = argv[0], argv[1:]
    out, linear = None, True
    if "--out" in rest:
        i = rest.index("--out")
        if i + 1 >= len(rest):
            raise config_lib.ConfigError("livt probe: --out needs a file name")
        out = Path(rest[i + 1])
        del rest[i:i + 2]
    if "--no_linear" in rest:
        rest.remove("--no_linear")
        linear = False
    cfg = config_lib.parse_args("pretrain", rest)
    resolve_normalization(cfg)
    vit = load_vit(encoder, cfg)
    results = {"encoder": encoder, "dataset": cfg.data.dataset, "seed": cfg.seed, **probe(vit, cfg, linear)}
    if out is None:
        out = (Path(cfg.output_dir) / f"probe-random-{cfg.data.dataset}-seed{cfg.seed}.json" if encoder == "random"
               else Path(encoder).with_suffix(".probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"train: {results['train']}; reported on {results['val']}")
    print(table(results))
    print(f"wrote {out}")
    return results
