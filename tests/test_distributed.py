"""Two CPU processes against one: `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU, a
gloo group (`--cpu --num_processes 2` would start ONE process without MPI, and the test would pass trivially).
Same training, every test image counted once. The stochastic parts that differ per process (mixup, drop path)
are off; per-sample augmentation and masking derive from (seed, epoch or step, index) and need no switching off."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO

DETERMINISTIC = ["--aug.mixup", "0", "--aug.cutmix", "0", "--model.drop_path_rate", "0", "--precision", "fp32",
                 "--data.test_per_class", "21", "--optim.batch_size", "16", "--run_name", "r"]


def free_port() -> int:
    with socket.socket() as s:  # a port of its own: tests may run side by side (pytest -n)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, out, processes, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    mode = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           script, "--data", "tiny", "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert yaml.safe_load((out / "r" / "config.yaml").read_text())["world_size"] == processes
    return out / "r"


def assert_close(a, b):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-7, msg=f"{a.name}: {k}")


@pytest.mark.parametrize("script, output, extra", [
    ("pretrain_mgp.py", "encoder.safetensors", ["--optim.batch_size", "16"]),
    ("finetune_bft.py", "classifier_last.safetensors", ["--from_scratch", *DETERMINISTIC]),
])
def test_two_processes_match_one(tmp_path, script, output, extra):
    one = launch(script, tmp_path / "one", 1, "--data.batch_size", "16", "--run_name", "r", *extra)
    two = launch(script, tmp_path / "two", 2, "--data.batch_size", "8", "--run_name", "r", *extra)
    assert_close(one / output, two / output)
    if script == "finetune_bft.py":
        r1 = json.loads((one / "test_results.json").read_text())
        r2 = json.loads((two / "test_results.json").read_text())
        assert r1["n"] == r2["n"] == 5 * 21  # odd-sized test set: every image exactly once
        assert r2["top1"] == pytest.approx(r1["top1"]) and r2["ece"] == pytest.approx(r1["ece"], abs=1e-3)
    # only the main process writes: one metrics row per logged step
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))
