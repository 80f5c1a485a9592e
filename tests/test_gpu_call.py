"""The prepared GPU call (benchmarks/gpu_all.sh) on the CPU at tiny sizes, as CI runs it: every part runs and
passes (its study is RESULTS.md's CPU-scale study command, checked run by run), and benchmarks/gpu_tables.py
turns its $OUT into the BENCHMARKS.md / RESULTS.md blocks with every expected row. The packed CIFAR-10-LT
(benchmarks/pack_cifar10_lt.py) round-trips bitwise."""

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks import gpu_tables, pack_cifar10_lt
from livt import config
from livt.data import build_dataset
from livt.data.cifar import long_tail_counts
from tests.conftest import REPO

STUDY_METHODS = ("bal_bce", "bal_ce", "ce", "bce", "bal_bce@scratch", "resnet_bal_ce", "ldam_drw")
TINY_STUDY = ("bal_bce", "bal_bce@scratch", "resnet_bal_ce")  # TINY: one of each kind (gpu_all.sh's METHODS)


def table_rows(md: str) -> list[str]:
    """The first cell of every body row of the markdown tables in `md`."""
    rows = [line for line in md.splitlines() if line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line)]
    return [row.split("|")[1].strip() for row in rows]


def bench_rows(md: str) -> set[tuple[str, str, str]]:
    """(stage, step, input) of livt bench's tables (each under a line naming its stage)."""
    rows, stage = set(), None
    for line in md.splitlines():
        if line.strip() in ("pretrain", "finetune"):
            stage = line.strip()
        elif stage and line.startswith("| ") and not line.startswith("| step"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows.add((stage, cells[0], cells[1]))
        elif line.strip() and not line.startswith("|"):
            stage = None  # the table under a stage ends at the next text line
    return rows


@pytest.mark.timeout(600)  # ~150 s alone on 2 cores; a loaded machine doubles it
def test_tiny_gpu_call_runs_on_cpu_and_becomes_the_tables(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "TINY": "1", "OUT": str(out), "WORK": str(work), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_all.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # what comes back from the device machine: at most 8 files, none deeper than 2 folders
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["machine.txt", "results.tar.gz", "status.tsv", "tables.md"]
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in status] == [(p, "0") for p in gpu_tables.PARTS]
    smoke = [json.loads(line) for line in (work / "results" / "smoke.jsonl").read_text().splitlines()]
    assert sorted(r["check"] for r in smoke) == sorted(gpu_tables.SMOKE_CHECKS)
    assert all(r["ok"] and r["device"] == "cpu" and r["precision"] == "fp32" for r in smoke), smoke
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/smoke_resume.log" in names and any(n.startswith("logs/runs/pretrain-") for n in names)
    assert not any(n.endswith(".safetensors") for n in names)

    md = (out / "tables.md").read_text()
    bench_md, results_md = md.split("<!-- RESULTS.md -->")
    assert "**missing**" not in md and "FAIL" not in md
    rows = table_rows(bench_md)
    for check in gpu_tables.SMOKE_CHECKS:
        assert rows.count(check) == 1, check
    for part in gpu_tables.PARTS:
        assert part in rows, part
    bench = bench_rows(bench_md)  # livt bench: both stages, the reference, livt eager / compiled, the inputs
    for stage in ("pretrain", "finetune"):
        for step, source in (("reference", "model only"), ("livt", "model only"), ("livt + compile", "model only"),
                             ("livt", "on_device")):
            assert (stage, step, source) in bench, (stage, step, source, bench)
        assert any(s == stage and src.startswith("jpeg") for s, _, src in bench), stage
    assert re.search(r"\| *pretrain.*\| *reference", bench_md)  # the input-pipeline table
    for key in ("- machine:", "- date:", "- command: `OUT=$OUT bash benchmarks/gpu_all.sh"):
        assert bench_md.count(key) == 3 and key in results_md, key  # (comparison.md adds its own date line)
    assert re.search(r"commit: \S+", md) and "commit: ?" not in md
    study_rows = [row.removesuffix(" (stale)") for row in table_rows(results_md)]  # stale: a dirty tree
    for method in TINY_STUDY:
        assert method in study_rows, method
    assert "| few | head | tail |" in results_md  # CIFAR-10-LT x100 has no few-shot class: head / tail halves too
    check_study_runs(work)


def check_study_runs(work):
    """TINY's study is RESULTS.md's CPU-scale CIFAR-10-LT study command (the `cifar10_lt_cpu` presets, MGP once,
    ViT rows from it and from scratch, a CNN recipe, compressed schedules) on a CIFAR-format stand-in."""
    table = {e["method"]: e for e in json.loads((work / "results" / "study" / "comparison.json").read_text())}
    assert set(table) == set(TINY_STUDY)
    for name, e in table.items():
        assert e["n_failed"] == 0 and 0 <= e["top1"] <= 100 and e["epochs"] == 1, (name, e)
    (pretrain,) = (work / "runs").glob("pretrain-*")
    assert (pretrain / "encoder.safetensors").is_file()
    cfgs = {name: yaml.safe_load((Path(e["run_dirs"][0]) / "config.yaml").read_text()) for name, e in table.items()}
    assert cfgs["bal_bce"]["pretrained"] == str(pretrain / "encoder.safetensors")
    assert cfgs["bal_bce@scratch"]["from_scratch"] and cfgs["resnet_bal_ce"]["from_scratch"]
    for cfg in cfgs.values():  # every split at 16 px, held in memory
        assert cfg["data"]["stored_size"] == cfg["data"]["img_size"] == 16 and cfg["data"]["on_device"]
    cnn = cfgs["resnet_bal_ce"]
    assert cnn["model"]["name"] == "resnet32" and cnn["optim"]["step_epochs"] == [1, 1]  # 160, 180 of 200
    assert cfgs["bal_bce"]["model"] == {**cfgs["bal_bce"]["model"], "name": "vit_micro", "patch_size": 4}


def test_gpu_study_preset_plans_every_row():
    """The GPU study's preset resolves for each of its rows as compare will run them (not run here: ViT-S)."""
    from livt import compare

    _, shared = compare.parse(["--data", "cifar10_lt_gpu", "--epochs", "20", "--pretrained", "mgp",
                               "--", "--data.root", "data_carry/cifar10_lt"])
    pre = config.parse_args("pretrain", ["--data", "cifar10_lt_gpu"])
    assert pre.model.name == "vit_small" and pre.data.on_device and pre.data.img_size == 32
    for method in STUDY_METHODS:
        name = method.removesuffix("@scratch")
        cfg = config.parse_args("finetune", ["--data", "cifar10_lt_gpu", "--method", name, *shared])
        assert cfg.data.on_device and cfg.data.img_size == 32 and cfg.data.imbalance == 100, method
        assert cfg.model.name == ("resnet32" if name.startswith(("resnet", "ldam")) else "vit_small"), method


def test_packed_cifar10_lt_round_trips_bitwise(tmp_path):
    """The packed set read by the preset equals the preset's own selection from the full set, in order (on a
    CIFAR-format stand-in here; the real pack is checked below when ../shared/data is there)."""
    full = tmp_path / "full"
    full.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 120), ("test", 3)):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        np.savez(full / f"{split}.npz", images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
                 labels=labels)
    sizes = pack_cifar10_lt.pack(full, tmp_path / "packed")
    assert set(sizes) == {"train.npz", "test.npz"}
    for split in ("train", "test"):
        a, b = (build_dataset(config.parse_args("finetune", ["--data", "cifar10_lt", "--data.root", str(root)]).data,
                              split) for root in (full, tmp_path / "packed"))
        assert np.array_equal(a.images, b.images) and np.array_equal(a.targets, b.targets), split
        assert len(a.targets) == {"train": sum(long_tail_counts(120, 10, 100)), "test": 30}[split]
    assert len(np.load(tmp_path / "packed" / "train.npz")["labels"]) == sum(long_tail_counts(120, 10, 100))


def test_real_packed_cifar10_lt_is_under_50_mib_and_equals_the_preset_selection(shared_data):
    """The packed data_carry/cifar10_lt (made by `python benchmarks/pack_cifar10_lt.py`, ~70 s) against the full
    CIFAR-10: under 50 MiB, and the same 12,406 training and 10,000 test images and labels, in the same order."""
    packed = REPO / "data_carry" / "cifar10_lt"
    if not (packed / "train.npz").is_file():
        pytest.skip("no data_carry/cifar10_lt: run python benchmarks/pack_cifar10_lt.py")
    size = sum(p.stat().st_size for p in packed.iterdir())
    assert size < 50 * 2**20, size
    for split, n in (("train", 12406), ("test", 10000)):
        a, b = (build_dataset(config.parse_args("finetune", ["--data", "cifar10_lt", "--data.root", str(root)]).data,
                              split) for root in (shared_data / "cifar10", packed))
        assert len(a.targets) == n and np.array_equal(a.images, b.images) and np.array_equal(a.targets, b.targets)
