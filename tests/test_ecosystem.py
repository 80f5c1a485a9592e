"""Tracking, the npz dataset kind, timm export, the model card and the import graph (issue 15)."""

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from livt import finetune, pretrain, tracking
from livt.checkpoint import CheckpointError, arch_of, save_model
from livt.config import ConfigError, parse_args
from livt.data import build_dataset, channel_stats, heldout_val
from livt.data.splits import ArrayDataset
from livt.export import TIMM_NAMES, pretrained_cfg, timm_model, timm_model_args
from livt.models import build_classifier

REPO = Path(__file__).resolve().parent.parent
# the tiny preset made smaller still: 2 optimizer steps an epoch
TINY = ["--data", "tiny", "--data.num_workers", "0", "--data.max_per_class", "16", "--data.test_per_class", "10"]


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------------------------
# Tracking


def test_tensorboard_events_then_resume_without_tracking(tmp_path):
    args = TINY + ["--from_scratch", "--output_dir", str(tmp_path), "--run_name", "tb", "--optim.epochs", "1"]
    run_dir = finetune.main(args + ["--log_with", "tensorboard"])
    tags = events(run_dir).Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", "test/top1", "test/few", "test/ece", "val_top1"):
        assert tag in tags["scalars"], tag
    assert {"test/per_class_accuracy", "test/reliability"} <= set(tags["images"])
    top1 = json.loads((run_dir / "test_results.json").read_text())["top1"]
    assert events(run_dir).Scalars("test/top1")[-1].value == pytest.approx(top1)
    steps = [e.step for e in events(run_dir).Scalars("train/loss")]
    assert steps == sorted(steps) and steps[-1] > 0
    n_event_files = len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*")))

    # same run (log_with is volatile: same hash, same directory), tracking off: --resume is accepted
    hash_before = yaml.safe_load((run_dir / "config.yaml").read_text())["config_hash"]
    again = finetune.main(args + ["--log_with", "none", "--resume", "auto"])
    assert again == run_dir
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["config_hash"] == hash_before
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == n_event_files


def test_missing_tracker_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(ConfigError, match=r"pip install 'livt\[tensorboard\]'"):
        tracking.check_tracker("tensorboard")
    with pytest.raises(ConfigError, match=r"livt\[tensorboard\]"):
        finetune.main(TINY + ["--from_scratch", "--output_dir", str(tmp_path), "--log_with", "tensorboard"])
    assert not any(tmp_path.iterdir())  # refused before a run directory exists
    with pytest.raises(ConfigError, match="--log_with: expected one of none, tensorboard, wandb, mlflow"):
        tracking.check_tracker("neptune")


class FakeTracker:
    def __init__(self, name):
        self.name, self.images, self.artifacts = name, {}, []

    def log_images(self, values, step=None, **kwargs):
        self.images.update({k: (np.asarray(v).shape, step, kwargs) for k, v in values.items()})


class FakeMLflow(FakeTracker):
    log_images = None

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append((Path(local_path).name, artifact_path))


class FakeAccelerator:
    is_main_process = True

    def __init__(self, trackers):
        self.trackers, self.logged, self.init = trackers, [], None

    def log(self, values, step=None):
        self.logged.append((values, step))

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        self.init = (project_name, config, init_kwargs)


def test_wandb_and_mlflow_through_fake_trackers(tmp_path):
    from PIL import Image

    png = tmp_path / "fig.png"
    Image.new("RGB", (6, 4), "red").save(png)
    wandb, mlflow = FakeTracker("wandb"), FakeMLflow("mlflow")
    acc = FakeAccelerator([wandb, mlflow])
    tracking.log_figures(acc, {"test/fig": png, "test/absent": tmp_path / "none.png"}, step=7)
    assert wandb.images == {"test/fig": ((1, 4, 6, 3), 7, {})}  # one (H, W, 3) image, no TensorBoard kwargs
    assert mlflow.artifacts == [("fig.png", "figures")]
    tracking.log_scalars(acc, {"step": 3, "top1": 50, "few": None, "per_class": [1.0], "ok": True}, 3, "test/")
    assert acc.logged == [({"test/top1": 50.0}, 3)]

    cfg = parse_args("finetune", ["--data", "tiny", "--log_with", "wandb"])
    tracking.start(acc, cfg, tmp_path / "run-x")
    project, hparams, init_kwargs = acc.init
    assert project == "livt" and init_kwargs["wandb"] == {"name": "run-x", "dir": str(tmp_path / "run-x")}
    assert hparams["optim.betas"] == "0.9,0.99" and hparams["model.name"] == "vit_micro"
    assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())


# ---------------------------------------------------------------------------------------------
# The npz dataset kind

TRAIN_COUNTS = [30, 20, 14, 10, 7, 5, 4]  # 7 classes, already long-tailed


def write_npz_set(root: Path, with_val: bool = False) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(7, 3))

    def split(counts):
        labels = np.repeat(np.arange(7), counts)
        images = np.clip(colours[labels][:, None, None, :] + rng.normal(0, 30, (len(labels), 32, 32, 3)), 0, 255)
        return {"images": images.astype(np.uint8), "labels": labels,
                "class_names": np.array([f"kind{c}" for c in range(7)])}

    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", **split(TRAIN_COUNTS))
    np.savez(root / "test.npz", **split([5] * 7))
    if with_val:
        np.savez(root / "val.npz", **split([2] * 7))


def npz_args(root: Path, *extra: str) -> list[str]:
    return TINY + ["--data.dataset", "npz", "--data.root", str(root), "--data.num_classes", "7",
                   "--data.imbalance", "1", *extra]


def test_npz_both_stages_end_to_end(tmp_path, capsys):
    root = tmp_path / "mine"
    write_npz_set(root)
    out = ["--output_dir", str(tmp_path / "runs"), "--optim.epochs", "1"]
    pre = pretrain.main(npz_args(root, "--data.normalize", "from_train", "--log_with", "tensorboard", *out))
    assert "reconstruction" in events(pre).Tags()["images"]
    encoder = pre / "encoder.safetensors"
    run = finetune.main(npz_args(root, "--data.normalize", "from_train", "--pretrained", str(encoder), *out))

    results = json.loads((run / "test_results.json").read_text())
    assert results["n"] == 35 and results["selection"]["rule"] == "last"  # no val.npz: val is the test split
    mean, std = channel_stats(build_dataset(parse_args("finetune", npz_args(root)).data, "train"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["mean"] == list(mean) and saved["data"]["std"] == list(std)
    assert saved["sources"]["data.mean"] == "data.normalize from_train"
    with safe_open(str(run / "classifier.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["pretrained_cfg"])["mean"] == list(mean)
    assert json.loads(meta["class_names"]) == [f"kind{c}" for c in range(7)]

    card = (run / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["datasets"] == ["npz"] and "metrics" in front
    for section in ("## Data", "## Method", "## Config summary", "## Results", "## Figures", "## How to load"):
        assert section in card, section
    assert "test_per_class_accuracy.png" in card and "timm_model('classifier.safetensors')" in card
    assert timm_model(run / "classifier.safetensors").num_classes == 7

    from livt.cli import main as livt_main

    capsys.readouterr()
    livt_main(["stats", str(root / "train.npz")])
    assert capsys.readouterr().out.strip() == ("train.npz: 90 images, 7 classes, max 30, min 4, imbalance 7.5, "
                                               "many/medium/few 0 / 2 / 5")  # 30 and 20 are medium (20-100)


def test_npz_val_split_imbalance_and_errors(tmp_path):
    root = tmp_path / "mine"
    write_npz_set(root, with_val=True)
    d = parse_args("finetune", npz_args(root, "--data.imbalance", "10")).data
    train, val, test = (build_dataset(d, s) for s in ("train", "val", "test"))
    # floor(30 * 0.1 ** (i / 6)): 30, 20.4, 13.9, 9.5, 6.5, 4.4, 3.0
    assert np.bincount(train.targets).tolist() == [30, 20, 13, 9, 6, 4, 3]
    assert len(val) == 14 and heldout_val(val, test)
    assert train.class_names[3] == "kind3"
    (root / "val.npz").unlink()
    assert not heldout_val(build_dataset(d, "val"), test)
    d.num_classes = 5
    with pytest.raises(Exception, match="has 7 classes but data.num_classes is 5"):
        build_dataset(d, "train")


def test_channel_stats_by_hand():
    images = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    images[1:, :, :, 0] = 255  # red: 0, 1, 1 -> mean 2/3, std sqrt(2/9)
    images[:, :, :, 1] = 51  # green: 0.2 everywhere
    images[0, 0, 0, 2] = 255  # blue: one pixel of 12 -> mean 1/12, std sqrt(1/12 - 1/144)
    mean, std = channel_stats(ArrayDataset(images, np.zeros(3), ["a"], "hand"))
    assert mean == pytest.approx((2 / 3, 0.2, 1 / 12), abs=1e-6)
    assert std == pytest.approx(((2 / 9) ** 0.5, 0.0, (1 / 12 - 1 / 144) ** 0.5), abs=1e-6)


def test_normalize_rejects_unknown_value(tmp_path):
    with pytest.raises(ConfigError, match="--data.normalize: expected one of given, from_train"):
        finetune.main(TINY + ["--from_scratch", "--output_dir", str(tmp_path), "--data.normalize", "imagenet"])


# ---------------------------------------------------------------------------------------------
# timm export


def save_classifier(model, path: Path) -> Path:
    save_model(model, path, "classifier", arch_of(model),
               pretrained_cfg=pretrained_cfg(model, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 1.0))
    return path


@pytest.mark.parametrize("name", ["vit_micro", "vit_tiny", "vit_small"])
def test_timm_model_gives_identical_logits(tmp_path, name):
    torch.manual_seed(0)
    model = build_classifier(name, 32, 8, 7).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the init std 2e-5 would make every logit ~0
    x = torch.randn(3, 3, 32, 32)
    path = save_classifier(model, tmp_path / "c.safetensors")
    loaded = timm_model(path)
    assert type(loaded).__module__ == "timm.models.vision_transformer"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    import timm.data

    data_cfg = timm.data.resolve_data_config(model=loaded)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_pct"] == 1.0
    assert data_cfg["mean"] == (0.5, 0.4, 0.3) and data_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("name,patch", [("vit_base", 16), ("vit_large", 16), ("vit_huge", 14)])
def test_timm_args_rebuild_large_sizes_on_meta(name, patch):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = build_classifier(name, 224, patch, 1000)
        rebuilt = VisionTransformer(**timm_model_args(model), weight_init="skip")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want
    assert rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)  # strict: same keys
    registered = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000, global_pool="avg",
                                   device="meta")  # timm's own model of that size has the same tensors
    assert {k: tuple(v.shape) for k, v in registered.state_dict().items()} == want


def test_timm_model_refuses_cosine_head_and_non_classifiers(tmp_path):
    model = build_classifier("vit_micro", 32, 8, 7, head="cosine")
    path = save_classifier(model, tmp_path / "cos.safetensors")
    with pytest.raises(CheckpointError, match=r"'cosine' head .*livt.checkpoint.load_classifier"):
        timm_model(path)
    encoder = build_classifier("vit_micro", 32, 8, 7)
    save_model(encoder, tmp_path / "old.safetensors", "classifier")  # no pretrained_cfg (older files)
    with pytest.raises(CheckpointError, match=r"backbone 'vit_micro' has no timm architecture"):
        timm_model(tmp_path / "old.safetensors")


# ---------------------------------------------------------------------------------------------
# Import graph


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """livt module -> the livt modules it imports anywhere (top level or inside functions)."""
    files = {module_name(p): p for p in (REPO / "livt").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up (level - 1) packages from this module's package
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


# The one allowed function-level edge back: config checks `--decoupled.<option>` against the signature of the
# second stage's function in livt.stages.STAGES2, imported where a stage is named (livt.stages needs config).
LAZY_REGISTRY_EDGES = {("livt.config", "livt.stages")}


def test_no_import_cycle_among_livt_modules():
    graph = import_graph()
    for mod, dep in LAZY_REGISTRY_EDGES:
        source = (REPO / (mod.replace(".", "/") + ".py")).read_text()
        assert f"from {dep} import" in source or f"from {dep.rpartition('.')[0]} import {dep.rpartition('.')[2]}" \
            in source, (mod, dep)
        assert not any(line.startswith(("from " + dep, "import " + dep, "from livt import stages"))
                       for line in source.splitlines()), f"{mod} imports {dep} at the top level"
        graph[mod].discard(dep)
    assert graph["livt.data.stats"] >= {"livt.data.splits"} and "livt.data.stats" not in graph["livt.data.splits"]
    assert "livt.metrics" in graph["livt.figures"] and "livt.figures" not in graph["livt.metrics"]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
