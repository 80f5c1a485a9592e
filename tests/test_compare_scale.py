"""`livt compare` at scale on one node: device slots (pretended GPU ids on the CPU), several processes per run
through `accelerate launch`, the dry-run plan, --vary sweeps, and bad input refused before anything runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from livt import compare

# as tests/test_distributed.py: no per-process randomness, so 2 processes must match 1
DETERMINISTIC = ["--aug.mixup", "0", "--aug.cutmix", "0", "--model.drop_path_rate", "0", "--precision", "fp32",
                 "--data.test_per_class", "21", "--optim.batch_size", "16"]


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setenv(compare.FAKE_GPUS, "4")  # ids 0..3, runs on the CPU


def argv_of(tmp, *extra, methods="ce"):
    return ["--data", "tiny", "--methods", methods, "--epochs", "1", "--output_dir", str(tmp / "runs"),
            "--out", str(tmp / "table"), *extra]


def test_concurrent_runs_get_disjoint_devices_and_k_processes_match_one(tmp_path, four_gpus):
    two = compare.main(argv_of(tmp_path / "two", "--gpus", "0,1,2,3", "--gpus-per-run", "2",
                               "--", *DETERMINISTIC, methods="ce,bal_ce"))
    jobs = json.loads((two / "logs" / "jobs.json").read_text())
    assert [j["status"] for j in jobs] == ["done", "done"]
    for j in jobs:
        assert len(j["devices"]) == 2 and set(j["devices"]) <= {"0", "1", "2", "3"}
        # what the child saw, from its own results, and that it ran as 2 processes through accelerate launch
        own = json.loads((Path(j["run_dir"]) / "test_results.json").read_text())
        assert own["provenance"]["cuda_visible_devices"] == ",".join(j["devices"])
        cfg_text = (Path(j["run_dir"]) / "config.yaml").read_text()
        assert "world_size: 2" in cfg_text and "accum_steps: 1" in cfg_text  # micro-batch 16 -> 8 per process
        first_line = (two / "logs" / f"{Path(j['run_dir']).name}.log").read_text().splitlines()[0]
        assert first_line.startswith(f"CUDA_VISIBLE_DEVICES={','.join(j['devices'])} ACCELERATE_USE_CPU=true ")
        assert "accelerate.commands.launch --multi_gpu --num_processes 2" in first_line
    a, b = jobs
    assert a["started"] < b["ended"] and b["started"] < a["ended"]  # they ran at the same time ...
    assert not set(a["devices"]) & set(b["devices"])  # ... on disjoint devices

    one = compare.main(argv_of(tmp_path / "one", "--gpus", "2", "--", *DETERMINISTIC))
    (ref,) = json.loads((one / "logs" / "jobs.json").read_text())
    assert ref["devices"] == ["2"] and "accelerate" not in ref["command"]
    ta = load_file(Path(ref["run_dir"]) / "classifier_last.safetensors")
    tb = load_file(Path(jobs[0]["run_dir"]) / "classifier_last.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-7, msg=k)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, four_gpus, capsys):
    argv = argv_of(tmp_path, "--pretrained", "mgp", "--gpus", "0,1,2,3", "--gpus-per-run", "2", "--dry-run",
                   methods="ce,crt,bal_bce")
    cmp = compare.plan(*compare.parse(argv), ["ce", "crt", "bal_bce"], [0], [()], 2)
    pre, ce, crt, bal = cmp.jobs  # pretraining, ce (crt's stage 1, shared with the ce row), crt, bal_bce
    # a finished run from another commit, and an interrupted one with a saved state
    Path(bal).mkdir(parents=True)
    (Path(bal) / "test_results.json").write_text(json.dumps({"provenance": {"git_commit": "0" * 40}}))
    (Path(crt) / "state" / "step_000003").mkdir(parents=True)
    capsys.readouterr()
    assert compare.main(argv) is None
    out = capsys.readouterr().out
    name = lambda k: Path(k).name  # noqa: E731
    assert "plan: 4 runs for 3 rows: 3 to run, 1 reused; GPUs 0,1,2,3 (pretended, on the CPU), 2 per run" in out
    assert f"reuse    {name(bal)} (stale: another commit)" in out
    assert f"resume   {name(crt)} (resume from step_000003)" in out
    lines = out.splitlines()
    after = {lines[i].split()[1]: lines[i + 1] for i, line in enumerate(lines) if line.startswith(("run ", "resume"))}
    assert after[name(pre)].endswith("after: -")
    assert after[name(ce)].endswith(f"after: {name(pre)}") and after[name(crt)].endswith(f"after: {name(ce)}")
    assert "devices: any 2 of 0,1,2,3" in after[name(ce)]
    assert "ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2" in out
    assert "-m livt.cli pretrain --data tiny" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([name(bal), name(crt)])  # nothing ran
    assert not (tmp_path / "table").exists()


def test_vary_adds_a_row_per_value_and_shares_what_does_not_depend_on_it(tmp_path):
    out = compare.main(argv_of(tmp_path, "--vary", "loss.tau=0.5,2", methods="bal_bce"))
    table = json.loads((out / "comparison.json").read_text())
    assert [e["method"] for e in table] == ["bal_bce[tau=0.5]", "bal_bce[tau=2]"]
    for e, tau in zip(table, (0.5, 2.0)):
        assert e["errors"] == [] and e["method_name"] == "bal_bce"
        assert f"tau: {tau}" in (Path(e["run_dirs"][0]) / "config.yaml").read_text()

    def planned(*vary, methods=("crt",)):
        argv = argv_of(tmp_path, "--pretrained", "mgp", *[t for v in vary for t in ("--vary", v)])
        args, shared = compare.parse(argv)
        return compare.plan(args, shared, list(methods), [0], compare.parse_vary(args.vary, "tiny"))

    # a stage-2 key: one shared stage 1 (and pretraining), one stage 2 per value (crt's own option: a loss
    # option such as loss.tau is an option of the loss it names, which crt's ce is not)
    cmp = planned("decoupled.shift_bn=false,true")
    assert [r.method for r in cmp.rows] == ["crt[shift_bn=false]", "crt[shift_bn=true]"]
    (s1a, s2a), (s1b, s2b) = (r.jobs for r in cmp.rows)
    assert s1a == s1b and s2a != s2b and len(cmp.jobs) == 4
    assert "--decoupled.shift_bn" not in cmp.jobs[s1a].argv
    # a data key concerns every stage: a stage 1 and a pretraining per value; two keys: every combination
    cmp = planned("data.val_from_train=0.1,0.2", "optim.blr=1e-3,2e-3", methods=("ce",))
    assert [r.method for r in cmp.rows] == ["ce[val_from_train=0.1,blr=1e-3]", "ce[val_from_train=0.1,blr=2e-3]",
                                            "ce[val_from_train=0.2,blr=1e-3]", "ce[val_from_train=0.2,blr=2e-3]"]
    assert sum(j.stage == "pretrain" for j in cmp.jobs.values()) == 2 and len(cmp.jobs) == 6


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0,7"], "--gpus 0,7: no GPU 7 on this machine (visible: 0,1,2,3)"),
    (["--gpus", "0,1", "--gpus-per-run", "3"], "--gpus-per-run 3 is larger than the pool of 2 GPUs"),
    (["--gpus-per-run", "0"], "--gpus-per-run must be >= 1"),
    (["--vary", "loss.nope=1,2"], "--vary loss.nope=1,2: command line: unknown key 'loss.nope'"),
    (["--vary", "loss.tau=0.5,abc"], "--vary loss.tau=0.5,abc:"),
    (["--vary", "loss.tau"], "--vary loss.tau: expected KEY=VALUE1,VALUE2"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, four_gpus, extra, message):
    finished = tmp_path / "runs" / "finetune-finished" / "test_results.json"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")
    before = finished.stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        compare.main(argv_of(tmp_path, *extra))
    assert message in str(e.value)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["finetune-finished"]
    assert finished.stat().st_mtime_ns == before and not (tmp_path / "table").exists()


def test_no_gpu_means_the_cpu_as_before(tmp_path, monkeypatch):
    monkeypatch.delenv(compare.FAKE_GPUS, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    devices = compare.devices_of("", 1)
    assert devices.ids == [] and devices.slots == 1 and devices.take() == []
    job = compare.Job("runs/x", ["--data", "tiny"])
    assert compare.command(job)[1:] == ["-m", "livt.cli", "finetune", "--data", "tiny", "--resume", "auto"]
    with pytest.raises(SystemExit, match="--gpus-per-run 2 is larger than the pool of 0 GPUs"):
        compare.devices_of("", 2)
