"""The CUDA smoke of benchmarks/gpu_all.sh: each check runs livt's normal code path for a few steps on the
`tiny` preset and fails loudly (exit 1, an AssertionError naming what differed).

    python benchmarks/gpu_smoke.py CHECK --work DIR        # CHECK: cuda | stages | compile | nonfinite |
                                                             #        resume | accelerate | compare

On a machine with CUDA every run is bf16 on the GPU (`--precision bf16`); without one (TINY=1, the CPU check
of the call in CI) the same code runs in fp32 on the CPU, and the `cuda` check is the only one that differs
(it then only records that there is no GPU). One line of JSON per check is appended to DIR/smoke.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
PRECISION = "bf16" if CUDA else "fp32"
TINY = ["--data", "tiny", "--run_name", "r", "--precision", PRECISION, "--log_every", "1"]


def run(argv: list[str], log: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root with its output appended to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(argv)} (see {log.name})")
    return proc


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {r["step"]: (r["loss"], r["lr"]) for r in rows if "loss" in r}
    assert out and all(math.isfinite(v[0]) for v in out.values()), f"{run_dir}: non-finite or no loss: {out}"
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def differing(a: Path, b: Path) -> list[str]:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{a.name}: different keys"
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


def stages(work: Path, log: Path, *extra: str, finetune_only: tuple[str, ...] = ()) -> str:
    """Both stages a few steps (pretraining, then fine-tuning from its encoder), outputs and losses checked."""
    out = work / "runs"
    run([sys.executable, "pretrain_mgp.py", *TINY, "--output_dir", str(out / "mgp"), "--optim.epochs", "1",
         *extra], log)
    encoder = out / "mgp" / "r" / "encoder.safetensors"
    assert encoder.is_file(), f"no {encoder}"
    losses(out / "mgp" / "r")
    run([sys.executable, "finetune_bft.py", *TINY, "--output_dir", str(out / "bft"), "--optim.epochs", "1",
         "--pretrained", str(encoder), *extra, *finetune_only], log)
    result = json.loads((out / "bft" / "r" / "test_results.json").read_text())
    losses(out / "bft" / "r")
    return f"pretrain {len(losses(out / 'mgp' / 'r'))} + finetune {len(losses(out / 'bft' / 'r'))} logged steps, " \
           f"test top-1 {result.get('top1', result)}"


def check_cuda(work: Path, log: Path) -> str:
    if not CUDA:
        if os.environ.get("TINY"):
            return "no CUDA (TINY: the CPU check of the call)"
        raise AssertionError("torch.cuda.is_available() is False on the GPU machine")
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    y = (x @ x).float()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def check_stages(work: Path, log: Path) -> str:
    """Eager, the training set on the device (data.on_device: crop + flip there)."""
    return stages(work, log, "--data.on_device", "true", finetune_only=("--aug.rand_augment", "", "--aug.reprob", "0"))


def check_compile(work: Path, log: Path) -> str:
    """Regional torch.compile, the default loader path (workers, RandAugment, mixup, erasing)."""
    return stages(work, log, "--compile", "true")


def check_nonfinite(work: Path, log: Path) -> str:
    """A step whose loss is NaN (the mechanism of tests/test_resume.py: the stage's forward multiplies the loss
    by nan at chosen steps) leaves the weights, the fused AdamW's moments and its step count untouched, on the
    device, and the next good step changes them."""
    from livt import config, engine
    from livt.data import build_dataset
    from livt.data.loading import Augmented, TrainData
    from livt.data.transforms import eval_transform
    from livt.models.vit import create_vit

    bad = 2
    cfg = config.parse_args("finetune", ["--data", "tiny", "--output_dir", str(work / "runs"), "--run_name", "nf",
                                         "--optim.epochs", "1", "--precision", PRECISION])
    acc = engine.make_accelerator(PRECISION)
    run_dir = engine.prepare_run_dir(cfg, "finetune", acc)
    train = build_dataset(cfg.data, "train")
    model = create_vit("vit_micro", 32, 8, num_classes=5, global_pool="avg")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    holder: dict[str, engine.Trainer] = {}

    def snapshot() -> dict[str, torch.Tensor]:
        trainer = holder["t"]
        state = {f"w.{k}": v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
        for i, s in enumerate(trainer.optimizer.optimizer.state.values()):
            state.update({f"opt{i}.{k}": v.detach().clone() for k, v in s.items() if torch.is_tensor(v)})
        return state

    def forward(m, batch, progress):
        if batch.step in (bad, bad + 1, bad + 2):
            snapshots[batch.step] = snapshot()  # before this step's update (the previous one is queued before it)
        loss = torch.nn.functional.cross_entropy(m(batch.images), batch.labels)
        return loss * math.nan if batch.step == bad else loss

    data = TrainData(Augmented(train, eval_transform(32, cfg.data.mean, cfg.data.std), cfg.seed))
    holder["t"] = trainer = engine.Trainer(cfg, "finetune", acc, run_dir, model, data, train.targets, 5, forward)
    assert trainer.plan.total_steps >= bad + 3, trainer.plan.total_steps
    trainer.fit()
    before, after, later = snapshots[bad], snapshots[bad + 1], snapshots[bad + 2]
    assert before.keys() == after.keys() and any(k.endswith(".step") for k in before), sorted(before)[:5]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the skipped step changed {changed[:5]}"
    moved = [k for k in after if not torch.equal(after[k], later[k])]
    assert any(k.startswith("w.") for k in moved) and any(k.endswith("exp_avg") for k in moved), \
        "the good step after it changed nothing"
    assert trainer.state.skipped_steps == 1, trainer.state.skipped_steps
    device = next(trainer.unwrapped.parameters()).device
    steps = sorted({float(v.item()) for k, v in before.items() if k.endswith(".step")})
    return f"step {bad} skipped on {device}: {len(before)} tensors unchanged (AdamW step count {steps})"


def check_resume(work: Path, log: Path) -> str:
    """Killed (SIGKILL, mid-accumulation, data.on_device) and resumed with --resume auto equals the straight
    run: bitwise where the kernels are deterministic, else as close as two straight runs are to each other."""
    common = [*TINY, "--from_scratch", "--optim.epochs", "3", "--optim.batch_size", "32", "--save_every_steps", "1",
              "--data.on_device", "true", "--aug.rand_augment", "", "--aug.reprob", "0"]
    out = work / "runs"
    run([sys.executable, "finetune_bft.py", *common, "--output_dir", str(out / "a")], log)
    killed = run([sys.executable, "finetune_bft.py", *common, "--output_dir", str(out / "b"),
                  "--debug_kill_at_step", "4"], log, check=False)
    assert killed.returncode == -signal.SIGKILL, f"the kill at step 4 did not happen (exit {killed.returncode})"
    run([sys.executable, "finetune_bft.py", *common, "--output_dir", str(out / "b"), "--resume", "auto"], log)
    a, b = out / "a" / "r", out / "b" / "r"
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb), (sorted(la), sorted(lb))
    diff = differing(a / "classifier_last.safetensors", b / "classifier_last.safetensors")
    if not diff and la == lb:
        return f"bitwise equal after the kill at step 4 ({len(la)} steps)"
    # not bitwise: acceptable only where two straight runs differ too (non-deterministic kernels)
    run([sys.executable, "finetune_bft.py", *common, "--output_dir", str(out / "a2")], log)
    noise = differing(a / "classifier_last.safetensors", out / "a2" / "r" / "classifier_last.safetensors")
    assert noise, f"resumed run differs from the straight one in {diff[:5]} but two straight runs are equal"
    gap = max(abs(la[s][0] - lb[s][0]) for s in la)
    assert gap < 0.05, f"resumed losses differ by up to {gap}"
    return f"close, not bitwise ({len(diff)} tensors differ; two straight runs differ in {len(noise)} too)"


def check_accelerate(work: Path, log: Path) -> str:
    """`accelerate launch` through the normal entry point (one process: one GPU here)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16" if CUDA else "no", "--dynamo_backend", "no", *([] if CUDA else ["--cpu"])]
    run([*launch, "finetune_bft.py", *TINY, "--from_scratch", "--optim.epochs", "1",
         "--output_dir", str(work / "runs" / "acc")], log)
    cfg = (work / "runs" / "acc" / "r" / "config.yaml").read_text()
    assert (work / "runs" / "acc" / "r" / "classifier_last.safetensors").is_file()
    return f"finished, {len(losses(work / 'runs' / 'acc' / 'r'))} logged steps; world_size line: " + \
        next((line.strip() for line in cfg.splitlines() if "world_size" in line), "?")


def check_compare(work: Path, log: Path) -> str:
    """`livt compare` with two methods, as two processes at once."""
    table = work / "compare"
    run([sys.executable, "-m", "livt.cli", "compare", "--data", "tiny", "--methods", "ce,bal_bce", "--epochs", "1",
         "--jobs", "2", "--output_dir", str(work / "runs" / "cmp"), "--out", str(table)], log)
    rows = {e["method"]: e for e in json.loads((table / "comparison.json").read_text())}
    assert set(rows) == {"ce", "bal_bce"} and all(e["n_failed"] == 0 for e in rows.values()), rows
    return ", ".join(f"{m} top-1 {e['top1']:.1f}" for m, e in rows.items())


CHECKS = {name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=list(CHECKS))
    p.add_argument("--work", type=Path, required=True, help="scratch folder; smoke.jsonl and logs go here")
    args = p.parse_args(argv)
    work = args.work / args.check
    work.mkdir(parents=True, exist_ok=True)
    log = args.work / f"smoke_{args.check}.log"
    t0 = time.perf_counter()
    try:
        detail, ok = CHECKS[args.check](work, log), True
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then the exit code says it
        detail, ok = f"{type(e).__name__}: {e}", False
    row = {"check": args.check, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "device":
           "cuda" if CUDA else "cpu", "precision": PRECISION, "detail": detail}
    with (args.work / "smoke.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(("PASS " if ok else "FAIL ") + json.dumps(row), flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
