"""The training loop shared by both stages: run directories, resumable state, signals, logging.

Accelerate owns device placement, mixed precision and distribution. Three things are explicit here
because exact resumption depends on them:
- gradient accumulation: an optimizer step consumes `accum` micro-batches, gradients are synchronised
  on the last one only (`no_sync`), and training states are saved between optimizer steps only;
- randomness: every optimizer step reseeds torch / numpy / random from (seed, step, rank), and every
  sample's augmentation is seeded from (seed, epoch, index) (`livt.data.loading.Augmented`; the erasing
  noise of uint8 batches from (seed, step, rank, micro-batch)), so a resumed run draws the same masks,
  mixup pairs, drop paths and augmentations as an uninterrupted one;
- data order: the sampler is a function of (seed, epoch) and can start in the middle of an epoch.

No host sync on the critical path of a step: whether a step was finite and whether a process was asked
to stop are computed on the device (and all-reduced, so every rank decides alike); a non-finite step is
skipped on the device by the fused optimizer (its `found_inf`), and the host reads the decision one step
late, while the next step already runs, or at the next log / save / epoch end (`Trainer.settle`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from livt import config as config_lib
from livt import tracking
from livt.data.loading import Augmented, TrainData, derive_seed, make_loader
from livt.data.samplers import EvalSampler, TrainSampler
from livt.models import compile_blocks
from livt.optim import build_optimizer, lr_at, set_lr

STATE_DIR = "state"
LOOP_STATE = "loop_state.pt"


class RunDirError(RuntimeError):
    """The run directory holds another run, or this run without --resume."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Counters saved with every training state (Accelerate's custom checkpoint object)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_bad: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    train_seconds: float = 0.0  # wall time spent in training steps, summed over resumptions

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------
# Run set-up


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What code made a run: the git commit of livt's checkout (and whether its tree had uncommitted
    changes; both None for an installed wheel) and the library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # the GPUs it was given (livt compare)
        "versions": {"livt": ver("livt"), "python": platform.python_version(), "torch": str(torch.__version__),
                     **{pkg: ver(pkg) for pkg in ("timm", "accelerate", "numpy", "safetensors")}},
    }


def make_accelerator(precision: str, log_with: str = "none", project_dir: Path | None = None) -> Accelerator:
    """The Accelerator of a run; `log_with` (livt.tracking) logs under `project_dir`, the run directory."""
    mixed = {"auto": "bf16" if torch.cuda.is_available() else "no", "bf16": "bf16", "fp16": "fp16",
             "fp32": "no"}
    tracker = tracking.check_tracker(log_with)
    return Accelerator(mixed_precision=mixed[precision], log_with=tracker,
                       project_dir=str(project_dir) if project_dir is not None else None)


def prepare_run_dir(cfg: Any, stage: str, accelerator: Accelerator) -> Path:
    """Create (or re-enter) the run directory; refuse to mix two different runs in one."""
    run_dir = config_lib.run_dir(cfg, stage)
    resolve_resume(cfg.resume, run_dir)  # a wrong --resume fails before anything is built
    cfg_file = run_dir / "config.yaml"
    if accelerator.is_main_process and cfg_file.exists():
        old = yaml.safe_load(cfg_file.read_text()) or {}
        new_hash = config_lib.config_hash(cfg)
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif old.get("config_hash") != new_hash:
            current = config_lib.to_dict(cfg)
            old_flat = config_lib.flatten({k: v for k, v in old.items() if k in current})
            new_flat = config_lib.flatten(current)
            skip = config_lib.VOLATILE | config_lib.data_derived(cfg)
            diff = sorted(k for k in new_flat if k not in skip and old_flat.get(k) != new_flat[k])
            raise RunDirError(
                f"{run_dir} holds a different run (config hash {old.get('config_hash')} vs {new_hash}; "
                f"keys that differ: {', '.join(diff[:8]) or 'n/a'}). Pass --overwrite to replace it or "
                f"choose another --run_name.")
        elif not cfg.resume and stage != "eval":
            raise RunDirError(
                f"{run_dir} already holds this run. Pass --resume auto to continue it, or --overwrite "
                f"to start it again from scratch.")
    accelerator.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def start(cfg: Any, stage: str) -> tuple[Accelerator, Path]:
    """The accelerator and run directory of a run, with every RNG seeded from `cfg.seed`."""
    accelerator = make_accelerator(cfg.precision, cfg.log_with, config_lib.run_dir(cfg, stage))
    run_dir = prepare_run_dir(cfg, stage, accelerator)
    seed_step(cfg.seed, -1, 0)  # model initialisation: the same on every process
    return accelerator, run_dir


def write_config(cfg: Any, run_dir: Path, accelerator: Accelerator, **derived: Any) -> None:
    if accelerator.is_main_process:
        config_lib.save(cfg, run_dir / "config.yaml", config_hash=config_lib.config_hash(cfg),
                        provenance=provenance(), **derived)


def run_meta(cfg: Any, train: Any, counts: Any, **extra: Any) -> dict[str, Any]:
    """What a run's weight files carry in their metadata: the resolved config, the dataset kind, the training
    class counts (C,) and names, and `extra` (e.g. a timm `pretrained_cfg`)."""
    return dict(config=config_lib.to_dict(cfg), dataset=cfg.data.dataset, class_counts=counts.tolist(),
                class_names=train.class_names, **extra)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed every global RNG from (seed, step, rank): drop path, masking and mixup become functions
    of the step, independent of what ran before (the key to exact resume)."""
    s = derive_seed(seed, step + 1, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


class StopSignal:
    """SIGTERM / SIGUSR1 (pre-emption notices) ask the loop to save its state and exit cleanly."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name


class MetricsLog:
    """Append-only JSONL metrics file, written by the main process."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Training states


def state_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / STATE_DIR
    return sorted(root.glob("step_*")) if root.is_dir() else []


def state_dir(run_dir: Path, step: int, tmp: bool = False) -> Path:
    """The training-state folder of `step` (`tmp`: the one it is written into first)."""
    return run_dir / STATE_DIR / f"{'.tmp_' if tmp else ''}step_{step:09d}"


def fresh_state_dir(run_dir: Path, step: int) -> Path:
    """An empty temporary folder for the training state of `step` (`publish_state` renames it into place)."""
    tmp = state_dir(run_dir, step, tmp=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_state(run_dir: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """The complete state folder `tmp` renamed into place as step `step`'s; only the last `keep_last` kept."""
    final = state_dir(run_dir, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in state_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_training_state(accelerator: Accelerator, run_dir: Path, step: int, keep_last: int) -> Path:
    """Accelerate's save_state into a temporary folder, renamed into place once complete."""
    tmp = state_dir(run_dir, step, tmp=True)
    if accelerator.is_main_process:
        fresh_state_dir(run_dir, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_state(run_dir, tmp, step, keep_last)
    accelerator.wait_for_everyone()
    return state_dir(run_dir, step)


def save_loop_state(run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """The state of a loop outside the Trainer (`livt.afg`) as `LOOP_STATE` in a training-state folder,
    written to a temporary folder and renamed into place once complete (main process only)."""
    tmp = fresh_state_dir(run_dir, step)
    torch.save(state, tmp / LOOP_STATE)
    return publish_state(run_dir, tmp, step, keep_last)


def load_loop_state(resume: str, run_dir: Path) -> dict[str, Any] | None:
    """The loop state `--resume` names (`auto`: the run directory's latest), or None."""
    path = resolve_resume(resume, run_dir)
    if path is None:
        return None
    if not (path / LOOP_STATE).is_file():
        raise RunDirError(f"--resume: {path} holds no {LOOP_STATE}")
    return torch.load(path / LOOP_STATE, weights_only=True)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = state_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise RunDirError(f"--resume: no training state at {path}")
    return path


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Plan:
    """The step arithmetic of a run, derived once from the config."""

    micro_batch: int
    accum: int
    world: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    milestones: tuple[int, ...] = ()

    @staticmethod
    def make(optim: Any, micro_batch: int, world: int, batches_per_epoch: int) -> Plan:
        per_step = micro_batch * world
        if optim.batch_size % per_step:
            raise config_lib.ConfigError(
                f"optim.batch_size {optim.batch_size} is not a multiple of data.batch_size x processes "
                f"= {micro_batch} x {world}; change one of them")
        accum = optim.batch_size // per_step
        steps_per_epoch = batches_per_epoch // accum
        if steps_per_epoch == 0:
            raise config_lib.ConfigError(
                f"the training set gives {batches_per_epoch} micro-batches per process per epoch, fewer "
                f"than one optimizer step of {accum}; lower optim.batch_size")
        lr = optim.lr if optim.lr > 0 else optim.blr * optim.batch_size / 256
        return Plan(micro_batch, accum, world, steps_per_epoch, optim.epochs * steps_per_epoch,
                    round(optim.warmup_epochs * steps_per_epoch), lr,
                    tuple(e * steps_per_epoch for e in optim.step_epochs))

    def lr_at(self, step: int, optim: Any) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.lr, optim.min_lr, optim.schedule,
                     self.milestones, optim.step_gamma)

    def progress(self, step: int) -> float:
        """Training progress in [0, 1): the argument of every loss schedule (DRW, IB, GBL)."""
        return step / self.total_steps


class Batch(NamedTuple):
    """One micro-batch as the stage's forward sees it."""

    images: torch.Tensor  # (B, 3, H, W) float, on the device
    labels: torch.Tensor  # (B,) on the device
    indices: torch.Tensor  # (B,) dataset indices (CPU), for randomness independent of the process count
    step: int  # the optimizer step it belongs to


@dataclass
class Fitted:
    """What a second stage computed from features returns (`livt.stages`, `livt.afg`)."""

    head: torch.nn.Module
    selection: dict[str, Any]  # how the head was chosen (the results' `selection`)
    rows: list[dict[str, Any]]  # the rows of metrics.jsonl
    budget: dict[str, Any]  # epochs, steps, images_seen


class Trainer:
    """Runs optimizer steps over a dataset.

    The stage supplies `forward(model, batch, progress) -> loss`, `batch` an `engine.Batch` and `progress`
    the training progress in [0, 1) (`Plan.progress`). `data` is the training set with its batch finisher
    (`livt.data.loading.train_data`). `optimize` is the module whose trainable parameters the optimizer
    steps (default: `model`). Building it writes the resolved config, with the derived lr and step
    arithmetic, to the run directory.
    """

    def __init__(self, cfg: Any, stage: str, accelerator: Accelerator, run_dir: Path, model: torch.nn.Module,
                 data: TrainData, targets: np.ndarray, num_classes: int,
                 forward: Callable[[torch.nn.Module, Batch, float], torch.Tensor],
                 optimize: torch.nn.Module | None = None) -> None:
        self.cfg, self.stage, self.acc, self.run_dir = cfg, stage, accelerator, run_dir
        self.train_set, self.finish, self.forward = data.dataset, data.finish, forward
        self.sampler = TrainSampler(
            targets, num_classes, cfg.data.sampler, cfg.seed, cfg.data.batch_size,
            num_replicas=accelerator.num_processes, rank=accelerator.process_index,
            total_epochs=cfg.optim.epochs)
        self.plan = Plan.make(cfg.optim, cfg.data.batch_size, accelerator.num_processes,
                              self.sampler.batches_per_epoch)
        model.to(accelerator.device)
        if any(p.dim() == 4 for n, p in model.named_parameters() if "patch_embed" not in n):
            model.to(memory_format=torch.channels_last)  # CNNs: NHWC convolutions (ViTs: only the patch conv)
        # the optimizer's parameter groups come from `optimize` (default: the model itself), so a wrapper
        # such as livt.models.Adapter keeps the inner model's layer-decay / no-decay grouping
        optimizer = build_optimizer(optimize if optimize is not None else model, cfg.optim, self.plan.lr)
        if cfg.compile:
            compile_blocks(model)  # regional, in place: state-dict keys stay free of `_orig_mod.`
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)
        self.log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process)
        self.stop = StopSignal()
        self.skipped_images = 0
        self.pending: tuple[torch.Tensor, Any] | None = None  # the last step's flags, not yet read
        self.stop_agreed = False  # every rank has seen a stop request (set by `settle`)
        write_config(cfg, run_dir, accelerator, lr=self.plan.lr, accum_steps=self.plan.accum,
                     world_size=self.plan.world, steps_per_epoch=self.plan.steps_per_epoch)
        tracking.start(accelerator, cfg, run_dir)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def resume(self) -> None:
        path = resolve_resume(self.cfg.resume, self.run_dir)
        if path is not None:
            self.acc.load_state(str(path))
            self.acc.print(f"resumed from {path} at step {self.state.step}")

    def save(self) -> Path:
        self.settle()  # the counters saved include the last step's
        return save_training_state(self.acc, self.run_dir, self.state.step, self.cfg.keep_last)

    def fit(self, end_of_epoch: Callable[[int], dict[str, float]] | None = None) -> None:
        cfg, acc, plan, state = self.cfg, self.acc, self.plan, self.state
        self.resume()
        images_per_step = plan.micro_batch * plan.accum * plan.world
        bar = tqdm(total=plan.total_steps, initial=state.step, disable=not acc.is_main_process,
                   desc=self.stage, dynamic_ncols=True, mininterval=1.0)
        loss_sum = torch.zeros((), device=acc.device)
        interval_steps, t0 = 0, time.perf_counter()
        tick = t0
        start_epoch = state.step // plan.steps_per_epoch
        loader = make_loader(self.train_set, self.sampler, plan.micro_batch, cfg.data.num_workers)
        for epoch in range(start_epoch, cfg.optim.epochs):
            self.sampler.set_epoch(epoch)
            first = state.step - epoch * plan.steps_per_epoch
            self.sampler.set_start(first * plan.accum)
            batches = iter(loader)
            self.model.train()
            for _ in range(first, plan.steps_per_epoch):
                lr = plan.lr_at(state.step, cfg.optim)
                set_lr(self.optimizer, lr)
                loss = self._step(batches)
                now = time.perf_counter()
                state.train_seconds += now - tick
                tick = now
                loss_sum += loss
                interval_steps += 1
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == plan.total_steps:
                    self.settle()  # the interval ends with a sync anyway: read the last step's flags
                    mean_loss = (loss_sum / interval_steps).item()  # the one sync per interval
                    dt = time.perf_counter() - t0
                    row = dict(step=state.step, epoch=round(state.step / plan.steps_per_epoch, 3),
                               loss=mean_loss, lr=lr, images_per_s=interval_steps * images_per_step / dt,
                               skipped_steps=state.skipped_steps, skipped_images=self.skipped_images)
                    self.log.write(**row)
                    tracking.log_scalars(acc, row, state.step, prefix="train/")
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{row['images_per_s']:.0f}")
                    loss_sum.zero_()
                    interval_steps, t0 = 0, time.perf_counter()
                mid_epoch = state.step % plan.steps_per_epoch != 0  # epoch ends save below
                if cfg.save_every_steps and state.step % cfg.save_every_steps == 0 and mid_epoch:
                    self.save()
                if self.stop_agreed:
                    path = self.save()
                    acc.print(f"{self.stop.received}: saved the training state to {path}; exiting. "
                              f"Run the same command with --resume auto to continue.")
                    bar.close()
                    raise SystemExit(0)
            self.settle()
            if end_of_epoch is not None:
                row = end_of_epoch(epoch)
                if row:
                    self.log.write(step=state.step, epoch=epoch + 1, **row)
                    tracking.log_scalars(acc, row, state.step)
            if (epoch + 1) % cfg.save_every_epochs == 0 or epoch + 1 == cfg.optim.epochs:
                self.save()
            tick = time.perf_counter()  # evaluation and saving are not training time
        bar.close()
        if self.skipped_images:
            acc.print(f"skipped {self.skipped_images} unreadable images (data.skip_bad_images)")

    def _step(self, batches: Any) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches; returns the detached mean loss (0 if non-finite).

        Nothing here waits for the device: the step's finite / stop flags stay on it, the fused optimizer
        skips a non-finite update there, and the host reads the previous step's flags once this step's
        work is queued.
        """
        acc, plan, state, cfg = self.acc, self.plan, self.state, self.cfg
        seed_step(cfg.seed, state.step, acc.process_index)
        total = torch.zeros((), device=acc.device)
        for micro in range(plan.accum):
            images, labels, indices, n_skipped = next(batches)
            self.skipped_images += n_skipped
            images = self.finish(images.to(acc.device, non_blocking=True), state.step, acc.process_index, micro)
            labels = labels.to(acc.device, non_blocking=True)
            sync = micro == plan.accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                if len(images):
                    loss = self.forward(self.model, Batch(images, labels, indices, state.step),
                                        plan.progress(state.step))
                else:  # every image of the micro-batch was unreadable (skip_bad_images): a zero
                    # gradient keeps the processes' gradient exchanges in step
                    loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            acc.backward(loss / plan.accum)
            total += loss.detach().float() / plan.accum
            if cfg.debug_kill_at_step == state.step + 1 and micro == (plan.accum - 1) // 2:
                os.kill(os.getpid(), signal.SIGKILL)  # test switch: die mid-accumulation
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad or math.inf)
        fp16 = acc.mixed_precision == "fp16"  # the grad scaler skips inf/nan gradient steps itself
        bad_loss = ~torch.isfinite(total)
        bad_grad = ~torch.isfinite(torch.as_tensor(grad_norm, device=acc.device)) & (not fp16)
        flags = torch.stack([(bad_loss | bad_grad).float(), torch.tensor(float(bool(self.stop.received)),
                                                                          device=acc.device)])
        flags = acc.reduce(flags, reduction="sum") if acc.num_processes > 1 else flags
        self.settle()  # the previous step's decision, read while this step runs; may save and stop
        # the fused optimizer leaves the weights, its moments and its step count untouched where found_inf
        # is 1 (with fp16, Accelerate's grad scaler sets found_inf from the unscaled gradients instead)
        self.optimizer.optimizer.found_inf = (flags[0] > 0).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.pending = self._to_host(flags)
        return torch.where(bad_loss, torch.zeros_like(total), total)

    @staticmethod
    def _to_host(flags: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying `flags` to the host; (host tensor, event to wait on, or None when already there)."""
        if flags.device.type == "cpu":
            return flags, None
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(flags, non_blocking=True)
        event = torch.Event(flags.device)
        event.record()
        return host, event

    def settle(self) -> None:
        """Read the last step's flags (waiting only for that step): count a skipped step, note a stop
        that any rank asked for, and after `max_bad_steps` consecutive non-finite steps save and raise."""
        if self.pending is None:
            return
        (flags, event), self.pending = self.pending, None
        if event is not None:
            event.synchronize()
        bad, stop = (flags > 0).tolist()
        state = self.state
        if stop:
            self.stop_agreed = True
            self.stop.received = self.stop.received or "peer stop"
        if bad:
            state.skipped_steps += 1
            state.consecutive_bad += 1
        else:
            state.consecutive_bad = 0
        if state.consecutive_bad >= self.cfg.max_bad_steps:
            self.optimizer.zero_grad(set_to_none=True)  # a step in flight is dropped, not applied
            path = self.save()
            raise NonFiniteError(
                f"{state.consecutive_bad} consecutive optimizer steps had a non-finite loss or gradient "
                f"(last at step {state.step}, epoch {(state.step - 1) // self.plan.steps_per_epoch}); the training "
                f"state is saved in {path}. Try a lower --optim.blr, --optim.clip_grad 1.0, --precision bf16 "
                f"or fp32 instead of fp16, or check the data for broken images.")


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, dataset: Augmented, batch_size: int,
            num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of `dataset`, each exactly once, on every process.

    Each process evaluates indices rank, rank + world, ...; the results are padded to equal length,
    gathered, and the padding dropped by its index -1, then ordered by index.
    """
    model.eval()
    sampler = EvalSampler(len(dataset), accelerator.num_processes, accelerator.process_index)
    logits, labels, indices = [], [], []
    for images, y, idx, _ in make_loader(dataset, sampler, batch_size, num_workers):
        if not len(images):  # all unreadable (skip_bad_images)
            continue
        with accelerator.autocast():
            out = model(images.to(accelerator.device, non_blocking=True))
        out = out["logits"] if isinstance(out, dict) else out  # livt.models.Adapter of `outputs`
        logits.append(out.float())
        labels.append(y.to(accelerator.device))
        indices.append(idx.to(accelerator.device))
    inner = accelerator.unwrap_model(model)
    num_classes = getattr(getattr(inner, "model", inner), "num_classes", None)
    logits_t = torch.cat(logits) if logits else torch.zeros(0, num_classes, device=accelerator.device)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    idx_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        logits_t = accelerator.gather(accelerator.pad_across_processes(logits_t, dim=0))
        labels_t = accelerator.gather(accelerator.pad_across_processes(labels_t, dim=0))
        idx_t = accelerator.gather(accelerator.pad_across_processes(idx_t, dim=0, pad_index=-1))
    keep = idx_t >= 0
    order = torch.argsort(idx_t[keep])
    idx_sorted = idx_t[keep][order]
    if len(torch.unique(idx_sorted)) != len(idx_sorted):
        raise RuntimeError("distributed evaluation counted a sample twice")
    return logits_t[keep][order].cpu(), labels_t[keep][order].cpu()
