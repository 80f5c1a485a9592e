"""Reliability: a run killed (real SIGKILL) and resumed equals the uninterrupted run, bitwise on CPU;
SIGTERM saves and exits cleanly; non-finite steps are skipped and, repeated, stop the run."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from tests.conftest import REPO

# Tiny preset, 16 images per micro-batch, 2 micro-batches per optimizer step (accumulation),
# 2 optimizer steps per epoch, a training state after every step, one DataLoader worker.
COMMON = ["--data", "tiny", "--run_name", "r", "--data.num_workers", "1", "--optim.batch_size", "32",
          "--optim.epochs", "3", "--save_every_steps", "1", "--log_every", "1"]


def launch(script, out, *extra, check=True):
    """`python SCRIPT` (a path, or a list such as ['-m', 'livt.cli', 'stage2']) on the common arguments."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    program = [script] if isinstance(script, str) else list(script)
    proc = subprocess.run([sys.executable, *program, *COMMON, "--output_dir", str(out), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["lr"]) for r in rows if "loss" in r}


def assert_same_tensors(a, b):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


@pytest.mark.parametrize("script, outputs, extra", [
    ("pretrain_mgp.py", ["encoder.safetensors", "mae.safetensors"], []),
    # fine-tuning with RandAugment, mixup/cutmix, random erasing and drop path all on (tiny preset)
    ("finetune_bft.py", ["classifier_last.safetensors", "classifier.safetensors"], ["--from_scratch"]),
    # a scheduled loss: LDAM's deferred re-weighting switches on at step 5 of 6 (progress 4/6 >= 0.6),
    # after the kill at step 4, so the resumed process crosses the switch
    pytest.param("finetune_bft.py", ["classifier_last.safetensors", "classifier.safetensors"],
                 ["--from_scratch", "--method", "ldam", "--loss.drw_start", "0.6"], id="finetune-ldam-drw"),
])
def test_sigkill_mid_accumulation_then_resume_equals_straight_run(tmp_path, script, outputs, extra):
    straight = launch(script, tmp_path / "a", *extra)
    assert straight.returncode == 0
    killed = launch(script, tmp_path / "b", *extra, "--debug_kill_at_step", "4", check=False)
    assert killed.returncode == -signal.SIGKILL
    run_b = tmp_path / "b" / "r"
    assert sorted(p.name for p in (run_b / "state").iterdir()) == ["step_000000002", "step_000000003"]
    launch(script, tmp_path / "b", *extra, "--resume", "auto")
    for name in outputs:
        assert_same_tensors(tmp_path / "a" / "r" / name, run_b / name)
    a, b = metrics(tmp_path / "a" / "r"), metrics(run_b)
    assert a == b and sorted(a) == [1, 2, 3, 4, 5, 6]  # same losses and lr at every step


def test_monitored_pretraining_resumes_exactly_and_trains_like_an_unmonitored_run(tmp_path):
    """The kNN monitor (every epoch) neither breaks exact resume nor changes what is trained."""
    monitored = ["--monitor.every", "1"]
    launch("pretrain_mgp.py", tmp_path / "a", *monitored)
    killed = launch("pretrain_mgp.py", tmp_path / "b", *monitored, "--debug_kill_at_step", "4", check=False)
    assert killed.returncode == -signal.SIGKILL
    launch("pretrain_mgp.py", tmp_path / "b", *monitored, "--resume", "auto")
    launch("pretrain_mgp.py", tmp_path / "c", "--monitor.every", "0")  # monitor off
    for name in ("encoder.safetensors", "mae.safetensors"):
        assert_same_tensors(tmp_path / "a" / "r" / name, tmp_path / "b" / "r" / name)
        assert_same_tensors(tmp_path / "a" / "r" / name, tmp_path / "c" / "r" / name)
    assert metrics(tmp_path / "a" / "r") == metrics(tmp_path / "b" / "r") == metrics(tmp_path / "c" / "r")
    rows = [json.loads(line) for line in (tmp_path / "a" / "r" / "metrics.jsonl").read_text().splitlines()]
    probes = [(r["epoch"], r["knn_cls_top1"]) for r in rows if "knn_cls_top1" in r]
    assert [e for e, _ in probes] == [1, 2, 3] and all(0 <= acc <= 100 for _, acc in probes)
    resumed = [json.loads(line) for line in (tmp_path / "b" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in resumed if "knn_cls_top1" in r][-1] == [r for r in rows if "knn_cls_top1" in r][-1]
    assert (tmp_path / "a" / "r" / "training_curves.png").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_state_and_exits_cleanly(tmp_path, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "pretrain_mgp.py", *COMMON, "--output_dir", str(tmp_path), "--optim.epochs", "500"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    states = tmp_path / "r" / "state"
    deadline = time.time() + 120
    while not (states.is_dir() and any(states.glob("step_*"))) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"{sig.name}: saved the training state" in out + err
    saved = max(int(p.name.split("_")[1]) for p in states.glob("step_*"))
    assert 1 <= saved < 1000 and not (tmp_path / "r" / "encoder.safetensors").exists()
    assert not list(states.glob(".tmp*"))  # no half-written state left behind


@pytest.fixture
def reset_accelerate():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _trainer(tmp_path, bad_steps, max_bad, epochs):
    from livt import config, engine
    from livt.data import build_dataset
    from livt.data.loading import Augmented, TrainData
    from livt.data.transforms import eval_transform
    from livt.models.vit import create_vit

    cfg = config.parse_args("finetune", ["--data", "tiny", "--output_dir", str(tmp_path), "--run_name", "nf",
                                         "--max_bad_steps", str(max_bad), "--optim.epochs", str(epochs)])
    acc = engine.make_accelerator("fp32")
    run_dir = engine.prepare_run_dir(cfg, "finetune", acc)
    train = build_dataset(cfg.data, "train")
    model = create_vit("vit_micro", 32, 8, num_classes=5, global_pool="avg")

    def forward(m, batch, progress):
        loss = torch.nn.functional.cross_entropy(m(batch.images), batch.labels)
        return loss * math.nan if batch.step in bad_steps else loss

    data = TrainData(Augmented(train, eval_transform(32, cfg.data.mean, cfg.data.std), cfg.seed))
    return engine.Trainer(cfg, "finetune", acc, run_dir, model, data, train.targets, 5, forward)


def test_isolated_non_finite_steps_are_skipped_and_counted(tmp_path, reset_accelerate):
    trainer = _trainer(tmp_path, bad_steps={2, 4}, max_bad=3, epochs=2)
    trainer.fit()
    assert trainer.state.step == 10 and trainer.state.skipped_steps == 2
    assert all(torch.isfinite(v).all() for v in trainer.unwrapped.state_dict().values())
    rows = [json.loads(line) for line in (tmp_path / "nf" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 2 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_consecutive_non_finite_steps_save_and_stop(tmp_path, reset_accelerate):
    from livt.engine import NonFiniteError

    trainer = _trainer(tmp_path, bad_steps={3, 4, 5, 6}, max_bad=3, epochs=3)
    with pytest.raises(NonFiniteError, match=r"3 consecutive .* step 6, epoch 1.*state is saved in .*step_000000006"
                                             r".*--optim.blr.*clip_grad"):
        trainer.fit()
    assert (tmp_path / "nf" / "state" / "step_000000006").is_dir()


def test_crash_during_a_save_leaves_the_previous_state_usable(tmp_path, reset_accelerate):
    from livt.engine import resolve_resume, state_dirs

    trainer = _trainer(tmp_path, bad_steps=set(), max_bad=3, epochs=1)
    trainer.fit()
    run_dir = tmp_path / "nf"
    assert [p.name for p in state_dirs(run_dir)] == ["step_000000005"]

    def crash(path):  # a save that dies half-way: one file written, then an error
        (tmp_path / "nf" / "state" / ".tmp_step_000000005" / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    trainer.acc.save_state = crash
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert [p.name for p in state_dirs(run_dir)] == ["step_000000005"]
    assert resolve_resume("auto", run_dir) == run_dir / "state" / "step_000000005"
    assert (run_dir / "state" / "step_000000005" / "model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize("script, outputs, extra", [
    ("pretrain_mgp.py", ["encoder.safetensors"], []),
    # on-device augmentation runs crop + flip; mixup/cutmix and drop path stay on
    ("finetune_bft.py", ["classifier_last.safetensors"], ["--from_scratch", "--aug.rand_augment", "",
                                                          "--aug.reprob", "0"]),
], ids=["pretrain", "finetune"])
def test_on_device_data_sigkill_then_resume_equals_straight_run(tmp_path, script, outputs, extra):
    extra = [*extra, "--data.on_device", "true"]
    launch(script, tmp_path / "a", *extra)
    killed = launch(script, tmp_path / "b", *extra, "--debug_kill_at_step", "4", check=False)
    assert killed.returncode == -signal.SIGKILL
    launch(script, tmp_path / "b", *extra, "--resume", "auto")
    for name in outputs:
        assert_same_tensors(tmp_path / "a" / "r" / name, tmp_path / "b" / "r" / name)
    assert metrics(tmp_path / "a" / "r") == metrics(tmp_path / "b" / "r")
