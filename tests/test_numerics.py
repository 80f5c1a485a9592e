"""The speed options keep the numbers: a short bf16 run's loss curve follows the fp32 one (both stages), and
regional compilation (`compile_blocks`, --compile) gives eager's outputs and gradients and state-dict keys."""

import copy
import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from livt import finetune, pretrain
from livt.models import compile_blocks
from livt.models.vit import create_vit

# Largest relative loss difference allowed between the bf16 and the fp32 curve over 25 steps. Measured on the
# tiny preset at lr 2e-3: 3.6e-4 (MGP) and 2.6e-4 (BFT); the curves fall by ~30% over the run, and one step
# moves the loss by ~2% (MGP) to ~10% (BFT), so a bf16 run off course would show.
BF16_REL_TOL = 5e-3


def loss_curve(stage, out, precision):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = ["--data", "tiny", "--output_dir", str(out), "--run_name", precision, "--precision", precision,
            "--optim.epochs", "5", "--optim.lr", "2e-3", "--log_every", "1", "--save_every_epochs", "100"]
    run_dir = (pretrain.main([*args, "--figure_every", "100"]) if stage == "pretrain" else
               finetune.main([*args, "--from_scratch", "--eval_every", "100"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if "loss" in r])


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bf16_loss_curve_follows_fp32(tmp_path, stage, one_thread):
    fp32, bf16 = loss_curve(stage, tmp_path, "fp32"), loss_curve(stage, tmp_path, "bf16")
    assert len(fp32) == len(bf16) == 25
    assert fp32[-5:].mean() < 0.9 * fp32[:5].mean()  # a run that learns, not a flat line
    assert not np.array_equal(fp32, bf16)  # bf16 autocast was on
    rel = np.abs(bf16 - fp32) / fp32
    assert rel.max() < BF16_REL_TOL, rel.max()


def test_regional_compile_matches_eager_outputs_gradients_and_keys(one_thread):
    """Inductor (gcc on the CPU; ~15 s to compile the block's forward and backward, once). At fp32 the
    compiled block differs from eager only by the order of floating-point sums: measured 1e-10 on the
    outputs and 6e-7 relative on the gradients; allowed 1e-5 and 1e-4 relative."""
    torch.manual_seed(0)
    eager = create_vit("vit_micro", 32, 8, num_classes=5, global_pool="avg")
    compiled = copy.deepcopy(eager)
    x = torch.randn(4, 3, 32, 32)
    torch._dynamo.reset()
    try:
        assert compile_blocks(compiled) == 4  # every block, compiled once for all
        outs = []
        for model in (eager, compiled):
            out = model(x)
            out.square().sum().backward()
            outs.append(out.detach())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 1  # the blocks ran compiled, not silently eager
    scale = outs[0].abs().max()
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * scale
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for name, p in compiled.named_parameters():
        assert (p.grad - grads[name]).abs().max() <= 1e-4 * grads[name].abs().max(), name
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
