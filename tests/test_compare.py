"""`livt compare` end to end on the tiny preset: runs, reuse, failures, the table from the run files."""

import csv
import json
from pathlib import Path

import pytest

from livt import compare


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    crash = tmp / "crash.yaml"  # resolves fine, fails inside its run: batch 24 is not a multiple of 16
    crash.write_text("about: {family: test, paper: none, summary: crashes}\noptim: {batch_size: 24}\n")
    argv = ["--data", "tiny", "--methods", f"ce,bal_ce,bal_bce,crt,nope,{crash}", "--seeds", "0", "--epochs", "1",
            "--jobs", "2", "--output_dir", str(tmp / "runs"), "--out", str(tmp / "table")]
    out = compare.main(argv)
    return tmp, argv, out


def test_table_equals_the_runs_own_results(comparison, capsys):
    tmp, _, out = comparison
    table = {e["method"]: e for e in json.loads((out / "comparison.json").read_text())}
    assert set(table) == {"ce", "bal_ce", "bal_bce", "crt", "nope", str(tmp / "crash.yaml")}
    for name in ("ce", "bal_ce", "bal_bce"):
        e = table[name]
        (run_dir,) = e["run_dirs"]
        own = json.loads((Path(run_dir) / "test_results.json").read_text())
        assert own["method"] == name and own["seed"] == 0
        for k in ("top1", "many", "medium", "few", "ece", "mce", "nll"):
            assert e[k] == own[k], (name, k)
        assert e["epochs"] == own["budget"]["epochs"] == 1 and e["images_seen"] == own["budget"]["images_seen"]
        per_class = sorted(csv.DictReader(open(Path(run_dir) / "test_per_class.csv")),
                           key=lambda r: -int(r["train_count"]))
        assert e["head"] == pytest.approx(sum(float(r["accuracy"]) for r in per_class[:2]) / 2)
    md = (out / "comparison.md").read_text()
    rows = {line.split(" | ")[0].strip("| ").split(" (")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert f"{table['bal_ce']['top1']:.1f}" in rows["bal_ce"]
    # a second stage starts from its stage 1's classifier (the `ce` row's run, shared) and counts its budget
    crt = table["crt"]
    (crt_dir,) = crt["run_dirs"]
    crt_own = json.loads((Path(crt_dir) / "test_results.json").read_text())
    assert crt_own["stage2"]["init_classifier"] == str(Path(table["ce"]["run_dirs"][0]) / "classifier.safetensors")
    assert crt["top1"] == crt_own["top1"] and crt["epochs"] == 2  # 1 stage-1 + 1 stage-2 epoch
    # the failures are named with their errors, and did not stop the others
    assert table["nope"]["n_failed"] == 1 and "no method 'nope'" in table["nope"]["errors"][0]
    crashed = table[str(tmp / "crash.yaml")]
    assert crashed["n_failed"] == 1 and "not a multiple" in crashed["errors"][0]
    assert "Failed runs:" in md and "no method 'nope'" in md
    assert (out / "comparison.csv").read_text().startswith("method,seeds,top1")
    assert (out / "shot_groups.png").stat().st_size > 0 and (out / "per_class.png").stat().st_size > 0
    for key in ("command:", "date:", "machine:", "commit:", "seeds:"):
        assert key in md


def test_second_call_reuses_every_finished_run(comparison, capsys):
    tmp, argv, out = comparison
    before = {p: p.stat().st_mtime_ns for p in (tmp / "runs").glob("*/test_results.json")}
    assert len(before) == 4
    capsys.readouterr()
    compare.main(argv)
    printed = capsys.readouterr().out
    events = [line.split()[0] for line in printed.splitlines() if line.split()]
    assert events.count("reused") == 4 and events.count("running") == 1  # only the crashing one runs again
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs").glob("*/test_results.json")} == before
    assert (out / "comparison.md").is_file()


def test_list_shows_family_and_paper(capsys):
    compare.main(["--list"])
    text = capsys.readouterr().out
    assert "| bal_bce | logit adjustment (binary) | Xu et al." in text


def test_forced_epochs_compress_the_recipe_schedule():
    from livt import config as config_lib
    cnn = config_lib.parse_args("finetune", ["--data", "cifar10_lt", "--method", "resnet_ce"]).optim
    assert compare.compressed_schedule(cnn, 20) == [
        "--optim.epochs", "20", "--optim.warmup_epochs", "0.5", "--optim.step_epochs", "16,18"]
    vit = config_lib.parse_args("finetune", ["--data", "cifar10_lt", "--method", "bal_bce"]).optim
    assert compare.compressed_schedule(vit, 10) == ["--optim.epochs", "10", "--optim.warmup_epochs", "1"]
