"""The runs of a comparison, whichever launcher runs them (livt.compare on this machine, livt.cluster on
SLURM): a job (one run directory), the plan, what a run directory already holds, a job's command line."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from livt.engine import provenance, state_dirs


@dataclass
class Job:
    """One fine-tuning (or pretraining) process of the comparison."""

    key: str  # the run directory: one job per directory, however many rows need it
    argv: list[str]
    stage: str = "finetune"
    deps: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | running | done | reused | failed
    error: str = ""
    note: str = ""  # what `classify` found in the run directory: stale, resume from a saved state
    proc: subprocess.Popen | None = None
    started: float = 0.0  # wall clock (time.time()) of the launch and of the end
    ended: float = 0.0
    devices: list[str] = field(default_factory=list)  # the GPU ids it ran on (CUDA_VISIBLE_DEVICES)
    log: Path | None = None

    @property
    def done_file(self) -> Path:
        return Path(self.key) / ("encoder.safetensors" if self.stage == "pretrain" else "test_results.json")


@dataclass
class Row:
    """One (method, seed) of the table, with the jobs it needs (its own last)."""

    method: str  # the row's name: METHOD[@scratch][key=value,...] (--vary)
    seed: int
    balanced: bool = False
    jobs: list[str] = field(default_factory=list)
    error: str = ""
    cnn: bool = False


@dataclass
class Comparison:
    """The plan of a comparison: its jobs (one per run directory) and its rows. Both launchers (this
    module's `run_jobs` on one machine, livt.cluster on SLURM) run `jobs` and build the table from `rows`."""

    jobs: dict[str, Job]
    rows: list[Row]
    ce_of: dict[str, str]  # --relative: the plain-CE row of each row's backbone
    seeds: list[int]
    processes: int = 1  # processes per run (--gpus-per-run)


def results_of(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "test_results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def current_commit() -> str | None:
    return provenance()["git_commit"]


def is_stale(results: dict, commit: str | None) -> bool:
    """Made by another commit than the current one (or from a tree with uncommitted changes)."""
    prov = results.get("provenance") or {}
    return commit is None or prov.get("git_commit") != commit or bool(prov.get("git_dirty"))


def classify(jobs: dict[str, Job], commit: str | None, rerun_stale: bool) -> None:
    """What each run directory already holds: a finished run is reused (`note` says when it is stale; with
    `rerun_stale` it runs again, --overwrite), an interrupted one resumes from its last saved state."""
    for job in jobs.values():
        if job.done_file.is_file():
            stale = job.stage != "pretrain" and is_stale(results_of(job.key) or {}, commit)
            job.note = "stale: another commit" if stale else ""
            if stale and rerun_stale:
                job.argv, job.note = [*job.argv, "--overwrite"], "stale: another commit, run again"
            else:
                job.status = "reused"
        elif state_dirs(Path(job.key)):
            job.note = f"resume from {state_dirs(Path(job.key))[-1].name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(job: Job, processes: int = 1, port: int | None = None) -> list[str]:
    """The command line of `job`: `python -m livt.cli STAGE ARGV --resume auto`, through `accelerate launch`
    (torchrun's launcher) with `processes` processes when there are several; its environment: `job_env`."""
    cli = ["-m", "livt.cli", job.stage, *job.argv, "--resume", "auto"]
    if processes == 1:
        return [sys.executable, *cli]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        launch += ["--main_process_port", str(port)]  # concurrent runs on one node: one port each
    return [*launch, *cli]


def job_env(ids: list[str], processes: int = 1, cpu: bool = False) -> dict[str, str]:
    """What a job's environment adds: its GPUs, and for several processes on the CPU (pretended GPUs)
    ACCELERATE_USE_CPU, which makes the launched processes one gloo group on the CPU (`accelerate launch --cpu`
    would start a single process without MPI)."""
    env = {"CUDA_VISIBLE_DEVICES": ",".join(ids)} if ids else {}
    return {**env, "ACCELERATE_USE_CPU": "true"} if cpu and processes > 1 else env


def shown(cmd: list[str], env: dict[str, str] | None = None) -> str:
    return " ".join([*(f"{k}={v}" for k, v in (env or {}).items()),
                     *(shlex.quote(c) for c in cmd)]).replace(shlex.quote(sys.executable), "python")


def say(msg: str) -> None:
    print(msg, flush=True)


def say_reused(job: Job) -> None:
    say(f"reused   {Path(job.key).name}{' (' + job.note + ')' if job.note else ''}")


def last_error(log: Path | None, code: int) -> str:
    """The last line of a failed run's log that names an error (its exception), else the exit code."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if "Error" in line or "error:" in line.lower():
            return line[:300]
    return f"exit code {code}"
