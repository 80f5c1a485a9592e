"""The registry walk: every registered loss, head, backbone, module, second stage and method recipe is whole.

Each entry builds and takes one optimizer step on a tiny model; a loss also goes through post-hoc adjustment
and the shifted-test-prior evaluation (its family), and is the loss of some recipe; every recipe has its row in
the README's methods and faithfulness tables. A half-registered entry (a loss without a recipe, a second stage
without a README row) fails here, not after a long run.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from livt import config as c
from livt import engine, evaluate, stages, tuning
from livt.data import build_dataset
from livt.data.transforms import TargetMaker
from livt.losses import LOSSES, SIGMOID, SOFTMAX
from livt.metrics import posthoc_adjust
from livt.models import BACKBONES, MODULES, build_classifier, build_model, outputs
from livt.models.heads import HEADS

REPO = Path(__file__).resolve().parent.parent
COUNTS = np.array([40, 23, 13, 7, 4])  # the tiny preset's class counts (5 classes, imbalance 10)
RECIPES = {name: c.read_method(name) for name in c.methods()}
CE = lambda out, labels: torch.nn.functional.cross_entropy(out["logits"], labels)  # noqa: E731
LARGE = ("vit_small", "vit_base", "vit_large", "vit_huge", "resnet50", "resnext50_32x4d")  # built on the meta device


def readme_names(heading: str) -> set[str]:
    """Backticked names in the first cell of the table rows under a README heading."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| ")]
    return {name for cell in rows for name in re.findall(r"`([a-z0-9_]+)`", cell)}


def recipe_config(method: str):
    """The config of a recipe on the tiny preset: `livt stage2` for a second stage, else `livt finetune`."""
    if RECIPES[method][1].get("stage2"):
        return c.parse_args("stage2", ["--data", "tiny", "--method", method, "--init_classifier", "x"])
    return c.parse_args("finetune", ["--data", "tiny", "--method", method])


def one_step(model: torch.nn.Module, criterion, make_targets=lambda images, labels: (images, labels),
             forward=outputs) -> float:
    """One SGD step on a batch of 8 random 32 px images (targets through `make_targets`, e.g. mixup); the
    loss, after checking that it is finite and that a weight moved."""
    torch.manual_seed(0)
    images, targets = make_targets(torch.randn(8, 3, 32, 32), torch.arange(8) % 5)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = criterion(forward(model, images), targets)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss), loss
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "no weight moved"
    return loss.item()


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_whole(name):
    assert LOSSES[name].family in (SOFTMAX, SIGMOID)
    users = [m for m, (_, keys, _, _) in RECIPES.items() if keys.get("loss.name") == name]
    assert users, f"loss '{name}' is the loss of no recipe in configs/methods/ (loss: {{name: {name}}})"
    cfg = recipe_config(users[0])
    cfg.model.name, cfg.model.patch_size = ("resnet32", 8) if cfg.model.name.startswith("res") else ("vit_micro", 8)
    model = build_model(cfg, len(COUNTS))
    criterion = tuning.make_criterion(cfg.loss, COUNTS)
    make_targets = TargetMaker(cfg.aug, cfg.loss.label_smoothing, len(COUNTS))
    one_step(model, lambda out, targets: criterion(out, targets, 0.9), make_targets)  # past DRW's / IB's start
    # post-hoc adjustment to a known test prior, and the shifted-test-prior rows (--test_prior_imbalance)
    torch.manual_seed(1)
    logits, labels = torch.randn(100, 5), torch.arange(100) % 5
    shift = posthoc_adjust(logits, COUNTS, [5, 4, 3, 2, 1], name) - logits
    assert torch.allclose(shift, shift[0].expand_as(shift)) and shift[0, 0] > shift[0, 4]
    rows = evaluate.shifted_prior_rows(logits, labels, COUNTS, 5.0, name, seed=0)
    assert [r["post-hoc"] for r in rows] == ["no", "yes", "no", "yes"]


@pytest.mark.parametrize("head", [*HEADS, *MODULES])
def test_every_head_builds_and_steps(head):
    if head == "ncm":
        pytest.skip("the ncm head is computed by the ncm second stage, not trained (test_every_second_stage...)")
    model = build_classifier("vit_micro", 32, 8, len(COUNTS), head=head)
    one_step(model, CE)
    assert head == "linear" or any(keys.get("model.head") == head for _, keys, _, _ in RECIPES.values()), \
        f"head '{head}' is the head of no recipe"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_and_steps(name):
    if name in LARGE:  # shapes only: their weights would take seconds and gigabytes
        with torch.device("meta"):
            model = build_classifier(name, 32, 8, len(COUNTS))
            assert outputs(model, torch.empty(2, 3, 32, 32))["logits"].shape == (2, len(COUNTS))
        return
    one_step(build_classifier(name, 32, 8, len(COUNTS)),
             CE)


@pytest.mark.parametrize("name", list(stages.STAGES2))
def test_every_second_stage_has_a_recipe_and_runs(name, one_thread, tmp_path):
    users = [m for m, (_, keys, _, _) in RECIPES.items() if keys.get("stage2") == name]
    assert users, f"second stage '{name}' is the stage2 of no recipe in configs/methods/"
    for method in users:
        cfg = recipe_config(method)
        assert stages.check_request(cfg) is stages.STAGES2[name]
        assert set(cfg.decoupled.options) == set(stages.options(name))  # its options, from its signature
        assert RECIPES[method][2].get("stage1") in RECIPES, f"{method}: about.stage1 names no recipe"
    stage, cfg.model.name = stages.STAGES2[name], "vit_micro"
    model = build_classifier("vit_micro", 32, 8, len(COUNTS)).requires_grad_(False)  # a stage-1 stand-in
    if stage.trainable is not None:  # one step of what the stage trains, through the frozen backbone
        net, optimise = stage.trainable(model, cfg, **cfg.decoupled.options)
        one_step(net, tuning.make_criterion(cfg.loss, COUNTS), forward=lambda net, images: net(images))
        assert stage.export(net.model)(torch.zeros(1, 3, 32, 32)).shape == (1, len(COUNTS))
        return
    cfg.optim.epochs = 1  # the head from the tiny preset's features
    train, val = (build_dataset(cfg.data, split) for split in ("train", "val"))
    head = stage.solve(engine.make_accelerator("fp32"), model, cfg, tmp_path, train, val,
                       **cfg.decoupled.options).head
    assert head(torch.zeros(2, model.num_features)).shape == (2, len(COUNTS))


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_recipe_parses_and_has_its_readme_rows(method):
    cfg = recipe_config(method)
    assert cfg.loss.name in LOSSES and (cfg.model.head in HEADS or cfg.model.head in MODULES)
    assert {"family", "paper", "summary"} <= set(RECIPES[method][2]), f"{method}: about needs family, paper, summary"
    assert method in readme_names("Methods, and comparing them"), f"README: no methods-table row for '{method}'"
    assert method in readme_names("Faithfulness notes"), f"README: no faithfulness-table row for '{method}'"
