"""Stage 1 of LiVT: Masked Generative Pretraining of a ViT encoder on the long-tailed images only.

Outputs in the run directory: encoder.safetensors (what fine-tuning loads), mae.safetensors (with the
decoder, for visualisation), config.yaml, metrics.jsonl, reconstruction figures, training_curves.png (the
loss and, with --monitor.every N, the kNN probe accuracy of the encoder against epoch), training states.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from livt import config as config_lib
from livt import engine, probe, tracking
from livt.checkpoint import arch_of, save_model
from livt.data import build_dataset, heldout_val, resolve_normalization
from livt.data.loading import Augmented, train_data
from livt.data.stats import class_counts, describe
from livt.data.transforms import denormalize, eval_transform
from livt.figures import plot_reconstructions, plot_training_curves
from livt.models.mae import MAE, create_mae

NUM_FIGURE_IMAGES = 8


def mask_noise(seed: int, step: int, indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Masking noise (B, L) as a function of (seed, step, sample index) alone, so the masks of a global
    batch do not depend on how it is split over processes (nor on anything before this step)."""
    rows = []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(engine.derive_seed(seed, step, i))
        rows.append(torch.rand(num_patches, generator=g))
    return torch.stack(rows)


def mae_forward(cfg: config_lib.PretrainConfig) -> Callable[[MAE, engine.Batch, float], torch.Tensor]:
    """`forward(mae, batch, progress) -> loss` of pretraining: the MAE loss under the masks of `mask_noise`."""
    num_patches = (cfg.data.img_size // cfg.model.patch_size) ** 2

    def forward(mae: MAE, batch: engine.Batch, progress: float) -> torch.Tensor:
        noise = mask_noise(cfg.seed, batch.step, batch.indices, num_patches).to(batch.images.device, non_blocking=True)
        return mae(batch.images, noise=noise)[0]
    return forward


def reconstruction_figure(mae: MAE, images: torch.Tensor, mean: tuple, std: tuple, path: Path) -> None:
    """Original / masked / reconstruction rows of fixed images under a fixed mask."""
    mae.eval()
    generator = torch.Generator(device=images.device).manual_seed(0)
    with torch.no_grad():
        masked, recon = mae.reconstruct(images, generator=generator)
    to_01 = lambda x: denormalize(x.float(), mean, std).clamp(0, 1).cpu()
    plot_reconstructions(to_01(images), to_01(masked), to_01(recon), path)


def run(cfg: config_lib.PretrainConfig) -> Path:
    resolve_normalization(cfg)  # recorded in config.yaml; not part of the run's name (config.data_derived)
    accelerator, run_dir = engine.start(cfg, "pretrain")
    d = cfg.data
    train = build_dataset(d, "train")
    val = build_dataset(d, "val") if cfg.monitor.every else None
    # what the monitor scores: the held-out val split, or the test split where the data has none (CIFAR-LT)
    scored = "val" if val is None or heldout_val(val, build_dataset(d, "test")) else "test split: no held-out val"
    counts = class_counts(train.targets, train.num_classes)
    accelerator.print(describe(counts, train.name))

    model = create_mae(cfg.model, cfg.mae, d.img_size)
    trainer = engine.Trainer(cfg, "pretrain", accelerator, run_dir, model,
                             train_data(cfg, "pretrain", train, accelerator.device), train.targets, train.num_classes,
                             mae_forward(cfg))

    fixed = Augmented(train, eval_transform(d.img_size, d.mean, d.std, d.eval_crop), cfg.seed)
    step = max(1, len(train) // NUM_FIGURE_IMAGES)
    figure_images = torch.stack([fixed[(0, i * step)][0] for i in range(NUM_FIGURE_IMAGES)])

    def end_of_epoch(epoch: int) -> dict[str, float]:
        last = epoch + 1 == cfg.optim.epochs
        row = {}
        if cfg.monitor.every and ((epoch + 1) % cfg.monitor.every == 0 or last):
            start = time.perf_counter()
            row = probe.monitor(accelerator, trainer.unwrapped.encoder, train, val, counts, cfg)
            accelerator.print(f"epoch {epoch + 1}: kNN top-1 ({scored}) cls {row['knn_cls_top1']:.2f}, "
                              f"mean {row['knn_mean_top1']:.2f} ({time.perf_counter() - start:.1f} s)")
        if accelerator.is_main_process and ((epoch + 1) % cfg.figure_every == 0 or last):
            figure = run_dir / f"reconstruction_epoch{epoch + 1:04d}.png"
            reconstruction_figure(trainer.unwrapped, figure_images.to(accelerator.device), d.mean, d.std, figure)
            tracking.log_figures(accelerator, {"reconstruction": figure}, trainer.state.step)
        trainer.model.train()
        return row

    trainer.fit(end_of_epoch)

    if accelerator.is_main_process:
        curves = run_dir / "training_curves.png"
        plot_training_curves(run_dir / "metrics.jsonl", curves)
        tracking.log_figures(accelerator, {"training_curves": curves}, trainer.state.step)
        mae = trainer.unwrapped
        meta = engine.run_meta(cfg, train, counts)
        save_model(mae.encoder, run_dir / "encoder.safetensors", "encoder", arch_of(mae.encoder), **meta)
        save_model(mae, run_dir / "mae.safetensors", "mae", arch_of(mae.encoder), **meta)
        accelerator.print(f"wrote {run_dir / 'encoder.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    import sys

    return run(config_lib.parse_args("pretrain", sys.argv[1:] if argv is None else argv))
