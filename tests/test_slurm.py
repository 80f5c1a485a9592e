"""`livt compare --launcher slurm` on a real single-node SLURM (tests/slurm_local.sh starts it: slurm-wlm + munge,
installed with apt-get when missing). Where it cannot start (not root, no package) these tests are skipped with
the reason; under CI (env CI or LIVT_REQUIRE_SLURM set) they fail instead. The xdist workers share one SLURM:
the first to need it starts it, the last to finish stops it."""

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

REQUIRED = bool(os.environ.get("CI") or os.environ.get("LIVT_REQUIRE_SLURM"))
SCRIPT = REPO / "tests" / "slurm_local.sh"


def unavailable(reason):
    (pytest.fail if REQUIRED else pytest.skip)(f"local SLURM unavailable: {reason}")


@contextlib.contextmanager
def locked(path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield f


@pytest.fixture(scope="session")
def slurm():
    """The local SLURM, shared by the xdist workers of one test run: the first user starts it, the last stops it."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        unavailable("submitit is not installed (pip install -e '.[cluster]')")
    users = Path(tempfile.gettempdir()) / f"livt-slurm-users-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"
    with locked(users) as f:
        f.seek(0)
        n = int(f.read() or 0)
        if n == 0:
            proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
            if proc.returncode:
                unavailable((proc.stderr or proc.stdout).strip()[-500:])
        f.truncate(0)
        f.write(str(n + 1))
    yield
    with locked(users) as f:
        f.seek(0)
        n = int(f.read()) - 1
        f.truncate(0)
        f.write(str(n))
        if n == 0:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)
            users.unlink()


def compare(out, *args, shared=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "livt.cli", "compare", "--data", "tiny", "--seeds", "0", "--output_dir", str(out),
           *args, "--", *shared]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def table(out):
    return {e["method"]: e for e in json.loads((out / "compare-tiny" / "comparison.json").read_text())}


def test_chain_and_mgp_finish_with_table_from_runs_then_second_submission_reuses(tmp_path, slurm):
    args = ["--methods", "ce,crt", "--epochs", "1", "--pretrained", "mgp", "--pretrain-args", "--optim.epochs 1",
            "--launcher", "slurm"]
    first = compare(tmp_path, *args)  # submits and returns
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("submitted ") == 3  # MGP, ce (crt's stage 1 too), crt
    assert first.stdout.count(" after ") == 2  # ce after MGP, crt after ce: SLURM dependencies
    collected = compare(tmp_path, *args, "--collect")  # crt cannot have started: it waits for MGP and ce
    assert collected.returncode == 0 and "submitted" not in collected.stdout, collected.stderr[-3000:]
    error = table(tmp_path)["crt"]["errors"][0]  # the first unfinished run of its chain, with its SLURM job
    assert re.fullmatch(r"seed 0: still (pending|running) \(SLURM job \d+\)", error), error
    waited = compare(tmp_path, *args, "--wait")  # the same command again follows the queued jobs
    assert waited.returncode == 0, waited.stdout[-3000:] + waited.stderr[-3000:]
    assert "submitted " not in waited.stdout.replace("submitted before", "")
    rows = table(tmp_path)
    for method in ("ce", "crt"):
        own = json.loads((tmp_path / rows[method]["run_dirs"][0] / "test_results.json").read_text())
        assert rows[method]["top1"] == own["top1"] and not rows[method]["errors"]
    second = compare(tmp_path, *args)  # once more: nothing is submitted
    assert second.returncode == 0 and "submitted" not in second.stdout, second.stdout[-3000:]
    assert [line.split()[0] for line in second.stdout.splitlines()[:3]] == ["reused"] * 3


def test_failing_job_is_named_its_dependent_cancelled_and_the_rest_finish(tmp_path, slurm):
    # ce starts from an encoder file that cannot be read: its job fails at run time; crt (after ce) is
    # cancelled by SLURM; bal_ce@scratch does not depend on either and finishes
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    proc = compare(tmp_path, "--methods", "ce,crt,bal_ce@scratch", "--epochs", "1", "--pretrained", str(bad),
                   "--launcher", "slurm", "--wait")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(tmp_path)
    assert rows["ce"]["n_failed"] == 1 and "broken.safetensors: not a safetensors file" in rows["ce"]["errors"][0]
    assert rows["crt"]["n_failed"] == 1 and "broken.safetensors" in rows["crt"]["errors"][0]  # its stage 1's error
    crt_line = next(line for line in proc.stdout.splitlines() if "-crt-" in line and line.startswith("failed"))
    assert crt_line.endswith("a run it depends on failed")  # cancelled by SLURM, never ran
    assert rows["bal_ce@scratch"]["n_failed"] == 0 and rows["bal_ce@scratch"]["top1"] is not None
    assert "| ce (failed) |" in (tmp_path / "compare-tiny" / "comparison.md").read_text()


def test_usr1_requeues_and_resumes_to_the_uninterrupted_weights(tmp_path, slurm):
    args = ["--methods", "ce", "--epochs", "4"]
    shared = ["--save_every_steps", "1"]
    proc = compare(tmp_path / "slurm", *args, "--launcher", "slurm", shared=shared)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "slurm").glob("finetune-*"))
    job_id = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
    deadline = time.time() + 300
    while not list(run_dir.glob("state/step_00000000[3-9]")) and time.time() < deadline:
        time.sleep(0.2)
    # what `sbatch --signal=USR1@T` sends at T seconds before the time limit: every process of the job's steps
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    # SLURM holds a requeued job for 2 minutes (its BeginTime) before it may start again: move that to now
    def requeued():  # back in the queue (it is COMPLETING first), with one restart
        state = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        return "JobState=PENDING" in state and "Restarts=1" in state

    while not requeued() and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    while "JobState=COMPLETED" not in subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                                                     text=True).stdout and time.time() < deadline:
        time.sleep(0.5)  # the same SLURM job runs again and resumes (following a queued job: the chain test)
    again = compare(tmp_path / "slurm", *args, "--launcher", "slurm", "--wait", shared=shared)
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout[-3000:]
    log = (tmp_path / "slurm" / "compare-tiny" / "logs" / f"{run_dir.name}.log").read_text()
    assert "SIGUSR1: saved the training state" in log and log.count(f"# SLURM job {job_id}") == 2, \
        again.stdout[-2000:] + log[-2000:]  # requeued: started twice
    straight = compare(tmp_path / "local", *args, shared=shared)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(run_dir / "classifier.safetensors")
    b = load_file(next((tmp_path / "local").glob("finetune-*")) / "classifier.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_bad_input_is_refused_before_anything_is_submitted(tmp_path, slurm, monkeypatch):
    from livt import compare as compare_lib

    def refused(*option):
        with pytest.raises(SystemExit) as e:
            compare_lib.main(["--data", "tiny", "--methods", "ce", "--output_dir", str(tmp_path), "--launcher",
                              "slurm", *option])
        return str(e.value.code)

    assert "--slurm.partition 'nosuch' is not a partition of this cluster (known: debug)" in \
        refused("--slurm.partition", "nosuch")
    assert "sbatch rejects the options" in refused("--slurm.extra=--nodes=99")
    assert "--slurm.time expects [D-]HH:MM:SS, got 'soon'" in refused("--slurm.time", "soon")
    assert "--gpus / --gpus-per-run / --jobs are for the local launcher" in refused("--gpus", "0")
    # a controller that does not answer: this cluster's configuration with another port
    conf = tmp_path / "slurm.conf"
    conf.write_text("".join(line for line in open(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
                            if not line.startswith("SlurmctldPort")) + "SlurmctldPort=6999\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert "the SLURM controller cannot be reached" in refused()
    assert not list(tmp_path.glob("finetune-*")) and not list(tmp_path.glob("compare-*"))


def test_dry_run_plans_multi_node_jobs_without_a_cluster(capsys):
    # no SLURM needed: the plan is printed, nothing is checked or submitted
    from livt import compare as compare_lib

    assert compare_lib.main(["--data", "tiny", "--methods", "crt", "--pretrained", "mgp", "--launcher", "slurm",
                             "--slurm.gpus_per_node", "4", "--slurm.nodes", "2", "--slurm.time", "1-12:00:00",
                             "--slurm.extra=--exclusive", "--dry-run", "--output_dir", "/nonexistent"]) is None
    out = capsys.readouterr().out
    assert "sbatch --time=2160 --nodes=2 --ntasks-per-node=1 --cpus-per-task=32 --signal=USR1@120 " \
           "--gpus-per-node=4 --exclusive" in out
    lines = out.splitlines()
    ce = next(i for i, line in enumerate(lines) if line.startswith("submit") and "-ce-" in line)
    assert lines[ce + 1].strip().startswith("after: afterok:pretrain-")
    assert "--num_processes 8 --num_machines 2 --machine_rank '$SLURM_NODEID' --main_process_ip FIRST_NODE" in out
    assert out.count("\nsubmit ") == 3 and out.startswith("plan: 3 SLURM jobs for 1 rows")
    assert not Path("/nonexistent").exists()
