"""Typed run configuration: one dataclass per command (pretrain, finetune, stage2, evaluate), YAML layers,
one override syntax.

Layers, lowest first, each strict:
    dataclass defaults < dataset preset (`--data NAME`: configs/pretrain/ or configs/finetune/NAME.yaml;
    `demo` when absent) < method recipe (`--method NAME`: configs/methods/NAME.yaml; finetune, or stage2 for
    a recipe that sets `stage2`) < `--config FILE` < `--section.key value` overrides.
Every key is checked: an unknown key or a value of the wrong type raises `ConfigError` naming the key
(and the file it came from) and suggesting the closest valid key. The resolved config remembers which
layer set each non-default value (`sources`), and `config.yaml` records it. A loss's options are its
function's own keyword arguments (`--loss.s 30`), checked against the loss named (`settle_options`).
A key with fixed choices is typed `Literal[...]` (a field, or an option's parameter annotation): any other
value raises at parse time, naming the key, its source and the choices, which `--help` lists.

A method recipe may hold a `by_dataset:` mapping of dataset kind -> keys, applied after its top-level
keys when `data.dataset` is that kind (e.g. a CNN recipe's ImageNet-LT protocol), and an `about:`
mapping (family, paper, summary; a second-stage recipe adds `stage1`, the method whose classifier it starts
from) that `livt compare --list` shows; neither is a config key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _config_dir() -> Path:
    """`configs/` of a checkout (or editable install), else the copy packaged inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "finetune").is_dir():
            return candidate
    raise RuntimeError(f"livt: no configs/ folder beside {here}; the installation is incomplete")


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and its source."""


# Fields that may change between a run and its resumption without making it a different run.
# They are left out of the config hash that names the run directory.
VOLATILE = {
    "run_name", "output_dir", "resume", "overwrite", "checkpoint", "debug_kill_at_step",
    "data.num_workers", "data.root", "data.split_dir", "data.download", "log_every",
    "save_every_steps", "save_every_epochs", "keep_last", "test_prior_imbalance", "posthoc", "max_bad_steps",
    "compile", "tta_aggregate", "tta_epochs", "tta_lr", "log_with",
    # the representation monitor only reads the weights: it changes nothing a run trains
    "monitor.every", "monitor.max_train", "monitor.max_val", "monitor.k", "monitor.temperature",
}

# Fixed choices of string keys: `coerce` accepts only these (from any layer), `--help` lists them, and the
# modules that branch on them read the same sets (`typing.get_args`). Registries that grow (losses, heads,
# backbones, datasets, second stages) are checked against their dicts instead.
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Tracker = Literal["none", "tensorboard", "wandb", "mlflow"]
Normalize = Literal["given", "from_train"]
Sampler = Literal["instance", "class_balanced", "sqrt", "progressive"]
Pipeline = Literal["pil", "fast", "draft"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "step"]
Crop = Literal["rrc", "pad"]
Select = Literal["auto", "best_val", "last"]
SELECTION_RULES = typing.get_args(Select)


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    """dataset kind: synthetic | cifar10_lt | cifar100_lt | imagenet_lt | imagenet_bal | places_lt | inat18 | folder |
    npz"""
    root: str = ""
    """image root (split-file sets, folder), or the folder holding train.npz/test.npz[/val.npz] (npz, CIFAR) or
    torchvision's CIFAR files"""
    split_dir: str = ""
    """folder with the split files (default: root)"""
    train_file: str = ""
    """train split file (default: the dataset's standard name inside split_dir)"""
    val_file: str = ""
    """val split file, for model selection (default: the standard name)"""
    test_file: str = ""
    """test split file, what is reported (default: the standard name)"""
    class_counts_file: str = ""
    """'<label> <count>' per line: training class counts when the train list is not at hand"""
    num_classes: int = 10
    """number of classes (synthetic, folder; checked against the data for the others)"""
    imbalance: float = 100.0
    """imbalance factor n_max / n_min of the exponential profile (synthetic, CIFAR-LT, npz, folder; 1 = keep all)"""
    max_per_class: int = 500
    """images of the largest class (synthetic)"""
    test_per_class: int = 100
    """test images per class (synthetic; val gets a fifth of it)"""
    stored_size: int = 0
    """in-memory sets (CIFAR, npz, synthetic): resize every split once at load to this square size (antialiased;
    0 = as stored), e.g. 16 to study CIFAR at a CPU budget; set data.img_size to match"""
    clutter: float = 1.0
    """synthetic: scale of the background grating, the background noise and the distractor probability (1 = the
    standard set, 0 = the object alone on a plain random background)"""
    balanced: bool = False
    """use the balanced variant of the same size (relative accuracy; CIFAR-LT and synthetic)"""
    per_class: int = 116
    """images per class of ImageNet-BAL"""
    subset_seed: int = 0
    """seed of the image subsampling (CIFAR-LT, ImageNet-BAL, folder), fixed across runs"""
    img_size: int = 32
    """input resolution"""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean"""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std"""
    normalize: Normalize = "given"
    """normalisation: given (data.mean / data.std) | from_train (per-channel statistics of the training
    images, computed before the run starts and written into its config and weights)"""
    batch_size: int = 64
    """micro-batch per device; accumulation fills optim.batch_size"""
    num_workers: int = 4
    """DataLoader worker processes"""
    sampler: Sampler = "instance"
    """training sampler"""
    val_from_train: float = 0.0
    """carve a stratified val split of this fraction from train (ceil per class, >= 1 image left in train;
    the class counts are those of what remains); 0 = the dataset's own val split"""
    eval_crop: float = 0.875
    """evaluation crop ratio: resize to img_size / eval_crop, centre-crop img_size (1.0 = full frame)"""
    on_device: bool = False
    """hold the training set on the device as uint8 and crop / flip / normalise batches there, no workers
    (in-memory sets: CIFAR, synthetic; fine-tuning needs aug.rand_augment '', aug.reprob 0)"""
    pipeline: Pipeline = "pil"
    """training images (livt.data.transforms.TrainTransform; not with on_device): pil (Pillow, the torchvision
    / timm transforms: the reference, the default, bit for bit the runs made so far) | fast (the same draws
    and ops; the crop drawn from the file's header, resized by torch's Pillow-compatible bicubic: within one
    grey level) | draft (fast + reduced-DCT JPEG decoding where the crop keeps >= img_size pixels a side)"""
    uint8_batches: bool = False
    """loader workers hand over uint8 images; normalisation and random erasing run batched on the device (the
    same erasing boxes, the noise drawn there from (seed, step)); default off, as the noise values change"""
    skip_bad_images: bool = False
    """skip unreadable images (counted and reported at the end) instead of stopping"""
    download: bool = False
    """allow torchvision to download CIFAR (never implicit)"""


@dataclass
class ModelConfig:
    name: str = "vit_base"
    """backbone: vit_micro | vit_tiny | vit_small | vit_base | vit_large | vit_huge | resnet32 | resnet50 |
    resnext50_32x4d (see livt.models.BACKBONES; the CNNs train --from_scratch)"""
    head: str = "linear"
    """classifier head (fine-tuning): linear | cosine (livt.models.heads.HEADS) | reslt (three branches, one
    shared classifier) | sade (three experts over shared layers) (livt.models.MODULES)"""
    head_scale: float = 30.0
    """scale s of the cosine head: logits = s * cos(w_c, x)"""
    patch_size: int = 16
    """patch size (ViT-H: 14; small images: 4 or 8)"""
    drop_path_rate: float = 0.0
    """stochastic depth rate"""


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    """fraction of patches removed per image"""
    norm_pix_loss: bool = True
    """regress per-patch normalised pixels"""
    decoder_embed_dim: int = 512
    """decoder width"""
    decoder_depth: int = 8
    """decoder blocks"""
    decoder_num_heads: int = 16
    """decoder attention heads"""


@dataclass
class OptimConfig:
    name: Optimizer = "adamw"
    """optimizer"""
    epochs: int = 800
    """training epochs"""
    warmup_epochs: float = 40.0
    """linear warmup epochs (per iteration)"""
    batch_size: int = 4096
    """effective batch = data.batch_size x processes x accumulation steps"""
    blr: float = 1.5e-4
    """base lr; lr = blr x effective batch / 256 (unless optim.lr is set)"""
    lr: float = 0.0
    """absolute peak lr, not scaled by the batch (0 = from blr)"""
    schedule: Schedule = "cosine"
    """lr after warmup: cosine (half-cycle to min_lr) | step (x step_gamma at each of step_epochs)"""
    step_epochs: tuple[int, ...] = (160, 180)
    """epochs at which the step schedule multiplies the lr by step_gamma"""
    step_gamma: float = 0.01
    """factor of each lr step: 0.01 after the first, 0.0001 after the second"""
    min_lr: float = 0.0
    """floor of the half-cycle cosine"""
    weight_decay: float = 0.05
    """weight decay"""
    decay_all: bool = False
    """weight decay on every parameter (CNN recipes); false = none on biases, norms and tokens"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = False
    """SGD Nesterov momentum"""
    layer_decay: float = 1.0
    """layer-wise lr decay (1 = off)"""
    clip_grad: float = 0.0
    """gradient-norm clipping (0 = off)"""


@dataclass
class LossConfig:
    name: str = "bal_bce"
    """loss (livt.losses.LOSSES): ce | bce | bal_ce | bal_bce | focal | cb_ce | cb_focal | cb_bce | weighted_ce |
    ldam | lade | ib | seql | cdt | gbl | label_aware_smoothing | reslt | sade"""
    test_prior_file: str = ""
    """'<label> <count>' file of a known test prior (Theorem 3; bal_bce's test_prior); empty = balanced test set"""
    label_smoothing: float = 0.1
    """label smoothing (through mixup targets)"""
    options: dict[str, Any] = field(default_factory=dict)
    """the loss's own options, given as --loss.<option> (e.g. --loss.tau 1.5, --loss.s 30): the parameters with a
    default of the loss function, checked against its signature and typed by its default (`loss_options`)"""


@dataclass
class AugConfig:
    crop: Crop = "rrc"
    """training crop: rrc (RandomResizedCrop over crop_scale, timm) | pad (pad by `pad`, random crop: CIFAR)"""
    pad: int = 4
    """padding of the pad crop"""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range"""
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec ('' = off)"""
    mixup: float = 0.8
    """mixup alpha (0 = off)"""
    cutmix: float = 1.0
    """cutmix alpha (0 = off)"""
    switch_prob: float = 0.5
    """probability of cutmix when both are on"""
    reprob: float = 0.25
    """random erasing probability (pixel mode)"""
    color_jitter: float = 0.0
    """colour jitter (off when RandAugment is used)"""


@dataclass
class DecoupledConfig:
    options: dict[str, Any] = field(default_factory=dict)
    """the second stage's own options, given as --decoupled.<option> (e.g. --decoupled.tau_steps 11,
    --decoupled.shift_bn true): the keyword-only parameters of the stage's function in livt.stages.STAGES2,
    checked against its signature and typed by its default (`stage2_options`)"""


@dataclass
class MonitorConfig:
    every: int = 0
    """pretraining: epochs between kNN probes of the encoder (livt.probe; 0 = off; the last epoch always probes)"""
    max_train: int = 10000
    """kNN probe: at most this many train images as the feature bank (a fixed random subset; 0 = all)"""
    max_val: int = 5000
    """kNN probe: at most this many val images scored (a fixed random subset; 0 = all)"""
    k: int = 20
    """kNN probe: neighbours that vote (DINO: 20)"""
    temperature: float = 0.07
    """kNN probe: a neighbour's vote is exp(cosine similarity / temperature) (DINO: 0.07)"""


@dataclass
class RunConfig:
    """Fields shared by both stages."""

    output_dir: str = "checkpoints"
    """root of the run directories"""
    run_name: str = ""
    """run directory name (default: <stage>-<data>-<model>-<config hash>)"""
    seed: int = 0
    """seed of initialisation, data order and augmentation"""
    precision: Precision = "auto"
    """mixed precision; auto = bf16 on GPU, fp32 on CPU"""
    resume: str = ""
    """'auto' = latest training state in the run directory, or a state directory"""
    overwrite: bool = False
    """replace a run directory that holds a different run"""
    log_every: int = 20
    """optimizer steps between progress lines"""
    save_every_steps: int = 0
    """optimizer steps between mid-epoch training-state saves (0 = none)"""
    save_every_epochs: int = 1
    """epochs between end-of-epoch training-state saves (the last epoch always saves)"""
    keep_last: int = 2
    """training states to keep"""
    max_bad_steps: int = 10
    """consecutive non-finite steps before the run saves and stops"""
    compile: bool = False
    """torch.compile the model"""
    log_with: Tracker = "none"
    """experiment tracker through Accelerate (pip install 'livt[NAME]')"""
    debug_kill_at_step: int = 0
    """test only: SIGKILL this process at that optimizer step, mid-accumulation"""


@dataclass
class PretrainConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    figure_every: int = 20
    """epochs between reconstruction figures (and at the end)"""


@dataclass
class ClassifierConfig(RunConfig):
    """Fields shared by the commands that make or read a classifier (finetune, stage2, evaluate)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path_rate=0.1))
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    test_prior_imbalance: float = 0.0
    """also report forward/backward long-tailed test sets of this imbalance, raw and post-hoc adjusted (0 = off)"""
    tta_aggregate: bool = False
    """SADE (model.head sade): also report expert weights learned on the UNLABELLED test images
    (transductive rows, beside the inductive ones)"""
    tta_epochs: int = 5
    """test-time aggregation: passes over the test images, two fresh augmented views each"""
    tta_lr: float = 0.025
    """test-time aggregation: SGD lr (momentum 0.9, batch data.batch_size) of the expert weights"""
    posthoc: bool = False
    """also report post-hoc logit adjustment z - tau log pi (tau swept on a held-out val split, else 1)"""


@dataclass
class TrainClassifierConfig(ClassifierConfig):
    """Fields shared by the commands that train a classifier (finetune, stage2)."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=100, warmup_epochs=10.0, batch_size=1024, blr=1e-3, min_lr=1e-6, betas=(0.9, 0.99),
        layer_decay=0.75))
    method: str = ""
    """the method recipe this run was built from (set by --method; '' = none)"""
    select: Select = "auto"
    """which epoch is reported: best_val (best val top-1; needs a val split that is not the test split) |
    last | auto (best_val when such a val split exists, else last)"""
    eval_every: int = 1
    """epochs between validation passes"""


@dataclass
class FinetuneConfig(TrainClassifierConfig):
    """`livt finetune`: a classifier from a pretrained encoder or from scratch."""

    pretrained: str = ""
    """pretraining .safetensors (encoder or full MAE) to start from"""
    from_scratch: bool = False
    """start from random weights (no --pretrained)"""


@dataclass
class Stage2Config(TrainClassifierConfig):
    """`livt stage2`: a second stage on the frozen backbone of a fine-tuned classifier."""

    decoupled: DecoupledConfig = field(default_factory=DecoupledConfig)
    init_classifier: str = ""
    """fine-tuned classifier .safetensors to start from (its backbone is frozen)"""
    stage2: str = ""
    """the second stage (set by a second-stage --method recipe): crt | tau_norm | lws | ncm | mislas | afg
    (see livt.stages.STAGES2)"""


@dataclass
class EvaluateConfig(ClassifierConfig):
    """`livt evaluate`: a saved classifier on the test split of `data`."""

    checkpoint: str = ""
    """fine-tuned .safetensors to evaluate"""


STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "stage2": Stage2Config, "evaluate": EvaluateConfig}
# the folder of a command's dataset presets (configs/<folder>/); the classifier commands share fine-tuning's
PRESET_DIRS = {"pretrain": "pretrain", "finetune": "finetune", "stage2": "finetune", "evaluate": "finetune"}
METHOD_COMMANDS = ("finetune", "stage2")  # the commands that take --method


# ---------------------------------------------------------------------------------------------
# Field introspection


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                docs[prev.target.id] = node.value.value.strip()
    return docs


def flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{'optim.lr': (type, doc), ...} for every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name == OPTIONS:
            continue  # an open mapping, checked against its owner's signature (`settle_options`)
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (tp, docs.get(f.name, ""))
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace("typing.", "")


def choices(tp: Any) -> tuple[str, ...]:
    """The allowed values of a `Literal[...]` type, () for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check `value` against the field type, converting strings from the command line."""
    def bad() -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and value in allowed:
            return value
        where = f"command line: --{key}" if source.startswith("--") else f"{source}: key '{key}'"
        raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        arg_types = [args[0]] * len(items) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        if len(arg_types) != len(items):
            raise bad()
        return tuple(coerce(key, v, t, source) for v, t in zip(items, arg_types))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"unsupported config field type {tp} for '{key}'")


def _unknown(key: str, valid: typing.Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


# ---------------------------------------------------------------------------------------------
# Building configs


def _set(cfg: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def update(cfg: Any, values: dict[str, Any], source: str) -> Any:
    """Apply flat {'a.b': value} updates to `cfg` in place, strictly; remembers `source` per key. The first
    bad key in the order given raises, after every key before it has been applied.

    `loss.<option>` (any key of the loss section that is not a field) goes into `loss.options`, checked
    against the loss these values name (or the one named before) and typed by its default;
    `decoupled.<option>` likewise for the second stage `stage2` names. Values that change that name start
    its options afresh: options given earlier belonged to the function they named."""
    fields = flat_fields(type(cfg))
    sources = sources_of(cfg)
    named = {}  # section -> the name these values give it (a bad one raises at its own key, in order)
    for section in open_sections(cfg):
        key = OPTION_TABLES[section][0]
        try:
            named[section] = coerce(key, values[key], str, source) if key in values else _named(cfg, section)
        except ConfigError:
            continue
        if named[section] != _named(cfg, section):
            getattr(cfg, section).options = {}
            for k in [k for k in sources if k.startswith(f"{section}.") and k.count(".") == 1]:
                if k.partition(".")[2] not in _section_fields(cfg, section):
                    del sources[k]
    for key, value in values.items():
        section, _, option = key.partition(".")
        if key in fields:
            _set(cfg, key, coerce(key, value, fields[key][0], source))
            sources[key] = source
            for sec in open_sections(cfg):
                if key == OPTION_TABLES[sec][0]:
                    option_table(cfg, sec)  # a name of nothing registered raises here
        elif section in open_sections(cfg) and option and "." not in option:
            sources[key] = source
            getattr(cfg, section).options[option] = _option(cfg, section, option, value, named.get(section))
        else:
            raise _unknown(key, fields, source)
    settle_options(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Open option mappings: a section's `options` holds the keyword options of the function a key names


OPTIONS = "options"


def loss_options(name: str) -> dict[str, tuple[Any, Any]]:
    """{option: (type, default)} of the registered loss `name` (KeyError if none)."""
    from livt import losses  # torch: only where a config with a loss is settled

    if name not in losses.LOSSES:
        raise KeyError(f"unknown loss '{name}'; choose one of {', '.join(losses.LOSSES)}")
    return losses.options(name)


def stage2_options(name: str) -> dict[str, tuple[Any, Any]]:
    """{option: (type, default)} of the second stage `name` ('' = none: no options; KeyError if unknown)."""
    if not name:
        return {}
    from livt import stages  # only where a second stage is named

    if name not in stages.STAGES2:
        raise KeyError(f"no second stage '{name}'; choose one of {', '.join(stages.STAGES2)}")
    return stages.options(name)


# section -> (the key that names its function, that function's option table)
OPTION_TABLES = {"loss": ("loss.name", loss_options), "decoupled": ("stage2", stage2_options)}


def open_sections(cfg: Any) -> list[str]:
    """The sections of a config (class or instance) that hold an options mapping."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return [s for s in OPTION_TABLES if s in names]


def _section_fields(cfg: Any, section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(getattr(cfg, section)) if f.name != OPTIONS]


def _named(cfg: Any, section: str) -> str:
    """The name of the function whose options `section` holds (e.g. cfg.loss.name, cfg.stage2)."""
    obj = cfg
    for part in OPTION_TABLES[section][0].split("."):
        obj = getattr(obj, part)
    return obj


def option_table(cfg: Any, section: str) -> dict[str, tuple[Any, Any]]:
    name_key, table_of = OPTION_TABLES[section]
    try:
        return table_of(_named(cfg, section))
    except KeyError as e:
        raise ConfigError(f"{sources_of(cfg).get(name_key, 'defaults')}: key '{name_key}': {e.args[0]}") from None


def _option(cfg: Any, section: str, option: str, value: Any, name: str | None) -> Any:
    """`value` typed as the option of the function `name` (ConfigError naming the key and listing the options
    of that function); unchecked while the name is bad (its own key raises)."""
    name_key, table_of = OPTION_TABLES[section]
    try:
        table = table_of(name) if name is not None else None
    except KeyError:
        table = None
    if table is None:
        return value
    key, where = f"{section}.{option}", sources_of(cfg)[f"{section}.{option}"]
    if option not in table:
        valid = [f"{section}.{k}" for k in [*_section_fields(cfg, section), *table]]
        shown_where = "command line" if where.startswith("--") else where
        raise ConfigError(f"{_unknown(key, valid, shown_where)} ({name_key} '{name}' takes the options: "
                          f"{', '.join(table) or 'none'})")
    return coerce(key, value, table[option][0], where)


def _registered(section: str) -> list[str]:
    """The names a section's options may belong to: every loss, every second stage."""
    if section == "loss":
        from livt.losses import LOSSES

        return list(LOSSES)
    from livt.stages import STAGES2

    return list(STAGES2)


def check_override(stage: str, data: str, key: str, value: str) -> None:
    """`--key value` as a runner applies it to several recipes (`livt compare --vary`): a loss or second-stage
    option is checked against every registered loss / stage that takes it (each run then checks its own),
    any other key by parsing it on the preset `data`. ConfigError naming the key."""
    section, _, option = key.partition(".")
    if section not in open_sections(STAGES[stage]) or not option or "." in option:
        parse_args(stage, ["--data", data, f"--{key}", value])
        return
    table_of = OPTION_TABLES[section][1]
    types = [table_of(name)[option][0] for name in _registered(section) if option in table_of(name)]
    if not types:
        valid = {f"{section}.{k}" for name in _registered(section) for k in table_of(name)}
        raise _unknown(key, sorted(valid), "command line")
    errors = []
    for tp in types:
        try:
            coerce(key, value, tp, "command line")
            return
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


def settle_options(cfg: Any) -> None:
    """Check each open section's given options against the options of the function it names, coerce them to
    the type of its default, and fill in the defaults of the rest (so every option of the chosen function
    is in the config, its hash and config.yaml, whether given or not). ConfigError naming the source."""
    sources = sources_of(cfg)
    for section in open_sections(cfg):
        sec, table, name_key = getattr(cfg, section), option_table(cfg, section), OPTION_TABLES[section][0]
        clash = sorted(set(table) & set(_section_fields(cfg, section)))
        if clash:
            raise ConfigError(f"{name_key} '{_named(cfg, section)}': option(s) {clash} shadow a field of the "
                              f"{section} section")
        given = {k: _option(cfg, section, k, v, _named(cfg, section)) for k, v in sec.options.items()
                 if f"{section}.{k}" in sources}
        sec.options = {k: given.get(k, default) for k, (_, default) in table.items()}
    if "loss" in open_sections(cfg) and cfg.loss.test_prior_file:
        from livt import losses

        if "test_prior" not in losses.signature(losses.LOSSES[cfg.loss.name].fn)[1]:
            takes = [n for n, entry in losses.LOSSES.items() if "test_prior" in losses.signature(entry.fn)[1]]
            raise ConfigError(f"{sources.get('loss.test_prior_file', 'loss.test_prior_file')}: loss "
                              f"'{cfg.loss.name}' takes no test prior in training (only {', '.join(takes)}); to "
                              f"evaluate under shifted test priors use --test_prior_imbalance")


def sources_of(cfg: Any) -> dict[str, str]:
    """{key: the layer (file or --key) that last set it}, kept on the config object (not a field)."""
    if "_sources" not in cfg.__dict__:
        cfg.__dict__["_sources"] = {}
    return cfg.__dict__["_sources"]


def non_default_sources(cfg: Any) -> dict[str, str]:
    """Where each value that differs from the dataclass default came from."""
    base = type(cfg)()
    for section in open_sections(cfg):  # an option is non-default where it differs from its function's default
        getattr(base, section).options = {k: d for k, (_, d) in option_table(cfg, section).items()}
    default = flatten(to_dict(base))
    current = flatten(to_dict(cfg))
    sources = sources_of(cfg)
    return {k: sources.get(k, "?") for k in current if current[k] != default.get(k) and k not in VOLATILE}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (not flattened); ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, ValueError, KeyError, RecursionError) as e:  # PyYAML raises all of these
        raise ConfigError(f"{path}: not valid YAML: {type(e).__name__}: {str(e)[:300]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    return flatten(read_yaml(path))


def presets(stage: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / PRESET_DIRS[stage]).glob("*.yaml"))


def shown(path: Path) -> str:
    """A built-in config file as `configs/...`, any other path as given."""
    try:
        return str(Path("configs") / path.resolve().relative_to(CONFIG_DIR))
    except ValueError:
        return str(path)


def preset_path(stage: str, name: str) -> Path:
    path = CONFIG_DIR / PRESET_DIRS[stage] / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--data: no preset '{name}' for {stage}; choose one of {', '.join(presets(stage))}")
    return path


# ---------------------------------------------------------------------------------------------
# Method recipes (configs/methods/<name>.yaml)

METHOD_DIR = CONFIG_DIR / "methods"
METHOD_META = ("about", "by_dataset")


def methods() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def method_path(name: str) -> Path:
    """configs/methods/<name>.yaml, or a path to a recipe file of one's own (ends in .yaml)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    path = METHOD_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, methods(), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--method: no method '{name}'{hint} (see `livt compare --list`; "
                          f"known: {', '.join(methods())})")
    return path


def read_method(name: str) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(path, flat config keys, about, {dataset kind: flat keys}) of a method recipe."""
    path = method_path(name)
    data = read_yaml(path)
    about = data.pop("about", {}) or {}
    by_dataset = data.pop("by_dataset", {}) or {}
    if not isinstance(about, dict) or not isinstance(by_dataset, dict) or not all(
            isinstance(v, dict) for v in by_dataset.values()):
        raise ConfigError(f"{path}: 'about' must be a mapping and 'by_dataset' a mapping of dataset kind -> keys")
    return path, flatten(data), about, {str(k): flatten(v) for k, v in by_dataset.items()}


def resolve(stage: str, data: str | None = None, method: str | None = None, config: str | None = None,
            overrides: list[tuple[str, Any]] | None = None) -> Any:
    """The config of `stage` from its layers (module docstring); each layer is strict."""
    cfg = STAGES[stage]()
    preset = preset_path(stage, data or "demo")
    layers: list[tuple[dict[str, Any], str]] = [(preset_keys(stage, preset), shown(preset))]
    if method:
        path, keys, _, by_dataset = read_method(method)
        check_method_command(stage, method, path, keys)
        layers.append(({**keys, "method": path.stem}, shown(path)))
        by_dataset_at = len(layers)
    if config:
        layers.append((load_yaml(config), str(config)))
    overrides = overrides or []
    if method:
        # the method's dataset-specific keys follow its top-level ones; the kind is the final one
        kind = cfg.data.dataset
        for values, _ in layers + [({k: v for k, v in overrides}, "")]:
            kind = values.get("data.dataset", kind)
        extra = by_dataset.get(str(kind))
        if extra:
            layers.insert(by_dataset_at, (extra, f"{shown(path)} (by_dataset.{kind})"))
    for values, source in layers:
        update(cfg, values, source)
    # the key that names a function first, so that --loss.s 20 --loss.name ldam means ldam with s 20
    names = {name_key for name_key, _ in OPTION_TABLES.values()}
    for key, value in sorted(overrides, key=lambda kv: kv[0] not in names):
        update(cfg, {key: value}, f"--{key}")
    return cfg


def preset_keys(stage: str, path: Path) -> dict[str, Any]:
    """A dataset preset's keys for `stage`: a preset of fine-tuning sets training keys (optim.*) that
    `livt evaluate` has no use for; those are left out (any other unknown key still raises)."""
    keys = load_yaml(path)
    unused = set(flat_fields(STAGES[PRESET_DIRS[stage]])) - set(flat_fields(STAGES[stage]))
    return {k: v for k, v in keys.items() if k not in unused}


def check_method_command(stage: str, method: str, path: Path, keys: dict[str, Any]) -> None:
    """A recipe that sets `stage2` is run by `livt stage2`, any other fine-tuning recipe by `livt finetune`."""
    if stage not in METHOD_COMMANDS:
        raise ConfigError(f"--method: method recipes are fine-tuning recipes, run by `livt finetune` or "
                          f"`livt stage2`, not `livt {stage}`")
    if stage == "finetune" and "stage2" in keys:
        raise ConfigError(f"--method {method}: {shown(path)} is a second stage (stage2: {keys['stage2']}) on a "
                          f"frozen backbone; run it with `livt stage2 --method {method} --init_classifier "
                          f"<stage-1 run>/classifier.safetensors`")
    if stage == "stage2" and "stage2" not in keys:
        raise ConfigError(f"--method {method}: {shown(path)} sets no stage2, so it is not a second stage; run it "
                          f"with `livt finetune --method {method}`")


# entries config.yaml holds beside the keys (see `save` and engine.write_config)
DERIVED = ("sources", "provenance", "config_hash", "lr", "accum_steps", "world_size", "steps_per_epoch")


def from_dict(stage: str, values: dict[str, Any], source: str = "dict") -> Any:
    """The config of a dict of keys, e.g. a run's config.yaml (its derived entries are skipped)."""
    cfg = STAGES[stage]()
    return update(cfg, flatten({k: v for k, v in values.items() if k not in DERIVED}), source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON values (tuples -> lists); a section's options stand beside its fields
    (loss.s, not loss.options.s), as they are given."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for section in open_sections(cfg):
        d[section].update(d[section].pop(OPTIONS))
    return d


def data_derived(cfg: Any) -> set[str]:
    """Keys a run sets from its data after the config is parsed (`data.normalize from_train`: data.mean /
    data.std, by livt.data.resolve_normalization). They follow from the keys that are hashed, so they are
    left out of the hash: the run's identity is the config as given, before and after resolution alike."""
    return {"data.mean", "data.std"} if cfg.data.normalize == "from_train" else set()


def config_hash(cfg: Any) -> str:
    """Hash of what defines the run; ignores what may change on resume (`VOLATILE`) and what the run
    derives from its data (`data_derived`)."""
    skip = VOLATILE | data_derived(cfg)
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in skip}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg: Any, stage: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    method = getattr(cfg, "method", "")
    return f"{stage}-{cfg.data.dataset}-{cfg.model.name}{'-' + method if method else ''}-{config_hash(cfg)}"


def run_dir(cfg: Any, stage: str) -> Path:
    """Where the run of `cfg` lives: the one source of truth, for the run itself and for `livt compare`."""
    return Path(cfg.output_dir) / run_name(cfg, stage)


def _show(value: Any) -> str:
    """A default as the command line takes it: tuples and lists comma-joined."""
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


def _options_help(table: dict[str, tuple[Any, Any]]) -> str:
    """'s=30.0, drw_mean=weighted {weighted|plain}': each option's default, and its choices if fixed."""
    shown = [f"{k}={_show(d)}" + (f" {{{'|'.join(choices(tp))}}}" if choices(tp) else "")
             for k, (tp, d) in table.items()]
    return ", ".join(shown) or "none"


def help_text(stage: str) -> str:
    script = {"pretrain": "pretrain_mgp.py (or livt pretrain)", "finetune": "finetune_bft.py (or livt finetune)"}
    method = " [--method NAME]" if stage in METHOD_COMMANDS else ""
    lines = [
        f"usage: {script.get(stage, f'livt {stage}')} [--data PRESET]{method} [--config FILE] [--key value ...]",
        f"presets (--data, default demo): {', '.join(presets(stage))}",
    ]
    if stage in METHOD_COMMANDS:
        mine = [m for m in methods() if ("stage2" in read_method(m)[1]) == (stage == "stage2")]
        lines.append(f"methods (--method; livt compare --list): {', '.join(mine)}")
    lines += [
        f"layers, lowest first: defaults < --data{' < --method' if method else ''} < --config < --key value.",
        "boolean keys may be given alone (--overwrite); '-' and '_' are interchangeable in keys;",
        "lists and tuples are comma-separated (--data.mean 0.5,0.5,0.5).",
        "",
    ]
    cfg = STAGES[stage]()
    current = flatten(to_dict(cfg))
    for key, (tp, doc) in flat_fields(STAGES[stage]).items():
        one_of = f" {{{'|'.join(choices(tp))}}}" if choices(tp) else ""
        lines.append(f"  --{key:<28}{one_of} {' '.join(doc.split())} [{_show(current[key])}]")
    if "loss" in open_sections(cfg):
        from livt.losses import LOSSES

        lines += ["", "options of each loss (--loss.<option> value; the function's defaults):"]
        for name in LOSSES:
            table = loss_options(name)
            lines.append(f"  {name:<22} " + _options_help(table))
    if "decoupled" in open_sections(cfg):
        from livt.stages import STAGES2

        lines += ["", "options of each second stage (--stage2 NAME --decoupled.<option> value; the defaults):"]
        for name in STAGES2:
            table = stage2_options(name)
            lines.append(f"  {name:<22} " + _options_help(table))
    return "\n".join(lines)


LAYER_FLAGS = ("data", "method", "config")


def _unknown_key(stage: str, key: str, valid: list[str]) -> ConfigError:
    """An unknown command-line key; one of another command's names that command."""
    others = [name for name in STAGES if name not in (stage, "pretrain") and key in flat_fields(STAGES[name])]
    if others and stage != "pretrain":
        return ConfigError(f"command line: --{key} is a key of `livt {others[0]}`, not of `livt {stage}`")
    return _unknown(key, valid, "command line")


def parse_args(stage: str, argv: list[str]) -> Any:
    """Build the config of `stage` from command-line tokens (see module docstring)."""
    fields = flat_fields(STAGES[stage])
    named: dict[str, str] = {}
    overrides: list[tuple[str, Any]] = []
    unknown: ConfigError | None = None  # the first unknown key, raised once a --method recipe had its say
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(help_text(stage))
            raise SystemExit(0)
        if not tok.startswith("--"):
            raise ConfigError(f"command line: expected --key, got '{tok}'")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_option = key.partition(".")[0] in open_sections(STAGES[stage]) and key.count(".") == 1
            bare = is_option or (key in fields and fields[key][0] is bool) or not (key in fields or key in LAYER_FLAGS)
            if bare and (nxt is None or nxt.startswith("--")):
                value = "true"  # a bare flag: a boolean (an option's type is checked once its function is named)
            elif nxt is None:
                raise ConfigError(f"command line: --{key} needs a value")
            else:
                value, i = nxt, i + 1
        i += 1
        if key in LAYER_FLAGS and not (key == "method" and stage not in METHOD_COMMANDS):
            if key in named:
                raise ConfigError(f"command line: --{key} given twice")
            named[key] = value
        elif key in fields or (key.partition(".")[0] in open_sections(STAGES[stage]) and key.count(".") == 1):
            overrides.append((key, value))  # a section's option is checked once its function is named
        elif unknown is None:
            unknown = _unknown_key(stage, key, list(fields) + list(LAYER_FLAGS))
    if "method" in named:  # `livt finetune --method crt --init_classifier F`: say which command runs crt
        path, keys, _, _ = read_method(named["method"])
        check_method_command(stage, named["method"], path, keys)
    if unknown is not None:
        raise unknown
    cfg = resolve(stage, named.get("data"), named.get("method"), named.get("config"), overrides)
    if isinstance(cfg, TrainClassifierConfig) and cfg.model.head == "ncm":
        raise ConfigError(f"{sources_of(cfg).get('model.head', 'model.head')}: the ncm head is not trained: it is "
                          f"computed from features by `livt stage2 --method ncm`")
    return cfg


def save(cfg: Any, path: str | Path, **extra: Any) -> None:
    """Write the resolved config (plus derived values such as the effective lr, and where each
    non-default value came from) as YAML."""
    d = to_dict(cfg)
    d.update(extra)
    d["sources"] = non_default_sources(cfg)
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "MAEConfig", "OptimConfig", "LossConfig", "AugConfig",
    "DecoupledConfig", "MonitorConfig", "PretrainConfig", "ClassifierConfig", "TrainClassifierConfig",
    "FinetuneConfig", "Stage2Config", "EvaluateConfig", "parse_args", "from_dict",
    "to_dict", "config_hash", "data_derived", "run_dir", "run_name",
    "update", "load_yaml", "save", "help_text", "flat_fields", "resolve", "methods", "read_method",
    "non_default_sources",
]
