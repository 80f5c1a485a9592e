"""Experiment tracking (`--log_with tensorboard | wandb | mlflow | none`) through Accelerate's trackers.

    python finetune_bft.py --data tiny --from_scratch --log_with tensorboard
    tensorboard --logdir checkpoints      # events in <run dir>/tensorboard/

What is logged: the resolved config as hyper-parameters (flattened, tuples comma-joined), every
progress row of the loop (loss, lr, images/s) and of the end of an epoch (val metrics) at its optimizer
step, and at the end the test metrics (`test/...`) and the figures as images (mlflow: as artifacts).
Only the main process writes (Accelerate's trackers are main-process only). The trackers are optional
extras; wandb and mlflow keep their own settings (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...).
`log_with` is volatile: switching it does not change the run (its hash) nor block `--resume`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from livt import config as config_lib

# --log_with value -> (module that must import, the pip extra that installs it)
TRACKERS: dict[str, tuple[str, str] | None] = {
    "none": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# Accelerate's `project_name`: TensorBoard's sub-folder of the run directory; the wandb project and the
# mlflow experiment
PROJECT = {"tensorboard": "tensorboard", "wandb": "livt", "mlflow": "livt"}


def check_tracker(log_with: str) -> str | None:
    """Accelerate's `log_with` for a `--log_with` value (None for none); ConfigError naming the extra when
    the tracker's package is not installed."""
    if log_with not in TRACKERS:
        raise config_lib.ConfigError(f"--log_with: expected one of {', '.join(TRACKERS)}, got '{log_with}'")
    if TRACKERS[log_with] is None:
        return None
    module, extra = TRACKERS[log_with]
    try:
        importlib.import_module(module)
    except ImportError:
        raise config_lib.ConfigError(
            f"--log_with {log_with}: the '{module}' package is not installed; pip install 'livt[{extra}]'"
        ) from None
    return log_with


def hparams(cfg: Any) -> dict[str, bool | int | float | str]:
    """The resolved config as flat scalars (what every tracker accepts as hyper-parameters)."""
    flat = config_lib.flatten(config_lib.to_dict(cfg))
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()}


def start(accelerator: Accelerator, cfg: Any, run_dir: Path) -> None:
    """Start the tracker of `cfg.log_with` (if any) with the config as hyper-parameters."""
    if cfg.log_with == "none":
        return
    init_kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir)},
                   "mlflow": {"run_name": run_dir.name}}
    accelerator.init_trackers(PROJECT[cfg.log_with], config=hparams(cfg), init_kwargs=init_kwargs)


def log_scalars(accelerator: Accelerator, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
    """The numeric entries of `values` (None and non-scalars left out) at optimizer step `step`."""
    row = {f"{prefix}{k}": float(v) for k, v in values.items()
           if k != "step" and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
    if row:
        accelerator.log(row, step=step)


def log_figures(accelerator: Accelerator, figures: Mapping[str, Path], step: int) -> None:
    """PNG files as images under their tags (TensorBoard, wandb), as artifacts for mlflow."""
    if not accelerator.is_main_process:
        return
    figures = {tag: Path(path) for tag, path in figures.items() if Path(path).is_file()}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            for path in figures.values():
                tracker.log_artifact(str(path), artifact_path="figures")
        elif hasattr(tracker, "log_images"):
            for tag, path in figures.items():
                image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
                extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images({tag: image[None]}, step=step, **extra)


__all__ = ["TRACKERS", "check_tracker", "hparams", "log_figures", "log_scalars", "start"]
