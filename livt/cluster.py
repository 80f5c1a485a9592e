"""`livt compare --launcher slurm`: every run of the comparison's plan (MGP pretraining, stage 1, fine-tuning) is one
SLURM job, submitted through submitit and chained with the scheduler's own `afterok` dependencies.

- One job per run directory, however many rows need it. A finished run is reused (as on one machine); a run whose
  SLURM job (`<run>/slurm_job.json`) is still pending or running is followed, not submitted again.
- Processes: `--slurm.gpus_per_node 0` (CPU): `python -m livt.cli ...`; N GPUs on one node: `accelerate launch
  --num_processes N`; M > 1 nodes: one task per node, each an Accelerate multi-machine launch.
- Pre-emption: jobs get `--signal=USR1@<slurm.signal_delay>`; the run saves its state and exits on SIGUSR1, then
  submitit requeues the job, which resumes (`--resume auto`).
- Before anything is submitted the controller must answer, the partition exist and `sbatch --test-only` accept
  the options; otherwise a SystemExit names the option.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from livt.jobs import Comparison, Job, classify, command, current_commit, last_error, say, say_reused, shown

STATE_FILE = "slurm_job.json"  # in the run directory: the SLURM job that makes it, and its log
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}  # UNKNOWN: the controller did not answer
PORT = 29500  # multi-node runs: the rendezvous port on the first node (one run per allocation)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher options of `livt compare`."""
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run the jobs on this machine; slurm: submit each as a SLURM job "
                        "(pip install 'livt[cluster]')")
    p.add_argument("--wait", action="store_true", help="slurm: follow the jobs and write the table at the end")
    p.add_argument("--collect", action="store_true",
                   help="slurm: submit nothing; rebuild the table from what finished (pending / failed are marked)")
    g = p.add_argument_group("SLURM (--launcher slurm)")
    g.add_argument("--slurm.partition", dest="slurm_partition", default="", help="partition ('' = the default)")
    g.add_argument("--slurm.gpus_per_node", dest="slurm_gpus_per_node", type=int, default=0,
                   help="GPUs per node and run (0: a CPU job)")
    g.add_argument("--slurm.nodes", dest="slurm_nodes", type=int, default=1, help="nodes per run")
    g.add_argument("--slurm.time", dest="slurm_time", default="24:00:00", help="time limit per job, [D-]HH:MM:SS")
    g.add_argument("--slurm.account", dest="slurm_account", default="")
    g.add_argument("--slurm.qos", dest="slurm_qos", default="")
    g.add_argument("--slurm.constraint", dest="slurm_constraint", default="")
    g.add_argument("--slurm.mem", dest="slurm_mem", default="", help="memory per node, e.g. 64G")
    g.add_argument("--slurm.cpus_per_task", dest="slurm_cpus_per_task", type=int, default=0,
                   help="CPUs per node and run, for its processes and data loaders (0: 8 per GPU, 1 on a CPU job)")
    g.add_argument("--slurm.signal_delay", dest="slurm_signal_delay", type=int, default=120,
                   help="seconds before the time limit at which the run gets SIGUSR1 (saves; the job is requeued)")
    g.add_argument("--slurm.extra", dest="slurm_extra", default="",
                   help="more sbatch options, e.g. --slurm.extra='--exclusive --mail-type=END'")


def processes(args: argparse.Namespace) -> int:
    """Processes per run: one per GPU of every node, one on a CPU node (after checking the --slurm.* values)."""
    time_minutes(args.slurm_time)
    extra_options(args)
    if args.slurm_nodes < 1 or args.slurm_gpus_per_node < 0 or args.slurm_cpus_per_task < 0:
        raise SystemExit("livt compare: --slurm.nodes must be >= 1, --slurm.gpus_per_node and "
                         "--slurm.cpus_per_task >= 0")
    if args.slurm_nodes > 1 and not args.slurm_gpus_per_node:
        raise SystemExit("livt compare: --slurm.nodes > 1 needs --slurm.gpus_per_node (multi-node runs are GPU runs)")
    return max(1, args.slurm_gpus_per_node) * args.slurm_nodes


def time_minutes(text: str) -> int:
    """'[D-]HH:MM:SS', 'HH:MM' or 'MM' -> minutes (rounded up)."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        if len(parts) > 3 or min(parts) < 0:
            raise ValueError
        if len(parts) == 1:
            return int(days or 0) * 1440 + parts[0]
        h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (parts[0], parts[1], 0)
        return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)
    except ValueError:
        raise SystemExit(f"livt compare: --slurm.time expects [D-]HH:MM:SS, got '{text}'") from None


def extra_options(args: argparse.Namespace) -> dict[str, str | bool]:
    """--slurm.extra '--exclusive --mail-type=END' -> {'exclusive': True, 'mail_type': 'END'} (submitit's form)."""
    extra: dict[str, str | bool] = {}
    for tok in shlex.split(args.slurm_extra):
        if not tok.startswith("--"):
            raise SystemExit(f"livt compare: --slurm.extra: '{tok}' is not a long sbatch option (--name[=value])")
        key, _, value = tok[2:].partition("=")
        extra[key.replace("-", "_")] = value or True
    return extra


def cpus_per_task(args: argparse.Namespace) -> int:
    return args.slurm_cpus_per_task or (8 * args.slurm_gpus_per_node or 1)


def sbatch_options(args: argparse.Namespace) -> list[str]:
    """The sbatch options every job gets (what `sbatch --test-only` checks and the dry run shows)."""
    opts = [f"--time={time_minutes(args.slurm_time)}", f"--nodes={args.slurm_nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={cpus_per_task(args)}", f"--signal=USR1@{args.slurm_signal_delay}"]
    if args.slurm_gpus_per_node:
        opts.append(f"--gpus-per-node={args.slurm_gpus_per_node}")
    opts += [f"--{name}={getattr(args, f'slurm_{name}')}" for name in ("partition", "account", "qos", "constraint",
                                                                       "mem") if getattr(args, f"slurm_{name}")]
    return opts + shlex.split(args.slurm_extra)


def scontrol(*cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SystemExit(f"livt compare --launcher slurm: '{cmd[0]}' not found (is SLURM installed here?)") from None


def check(args: argparse.Namespace) -> None:
    """Controller, partition and sbatch options, before anything is submitted."""
    for attempt in range(3):  # a busy controller may miss one ping
        ping = scontrol("scontrol", "ping")
        if not ping.returncode and "UP" in ping.stdout:
            break
        time.sleep(attempt + 1)
    else:
        raise SystemExit("livt compare --launcher slurm: the SLURM controller cannot be reached "
                         f"(scontrol ping: {(ping.stdout + ping.stderr).strip() or ping.returncode})")
    if args.slurm_partition and scontrol("scontrol", "show", "partition", args.slurm_partition).returncode:
        known = scontrol("sinfo", "-h", "-o", "%R").stdout.split()
        raise SystemExit(f"livt compare: --slurm.partition '{args.slurm_partition}' is not a partition of this "
                         f"cluster (known: {', '.join(known) or 'none'})")
    test = scontrol("sbatch", "--test-only", *sbatch_options(args), "--wrap", "true")
    if test.returncode:
        raise SystemExit(f"livt compare: sbatch rejects the options {' '.join(sbatch_options(args))} "
                         f"(--slurm.* / --slurm.extra): {test.stderr.strip()}")


def node_command(job: Job, gpus_per_node: int, nodes: int, rank: str = "", first_node: str = "") -> list[str]:
    """The command of `job` on one node of its allocation: `jobs.command`, with Accelerate's multi-machine
    options (this node's rank, the allocation's first node as the rendezvous) when the run spans several nodes;
    in a job they are read from SLURM's environment."""
    cmd = command(job, max(1, gpus_per_node) * nodes)
    if nodes == 1:
        return cmd
    if not first_node:
        first_node = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                                    capture_output=True, text=True, check=True).stdout.split()[0]
    i = cmd.index("--num_machines")
    return [*cmd[:i], "--num_machines", str(nodes), "--machine_rank", rank or os.environ["SLURM_NODEID"],
            "--main_process_ip", first_node, "--main_process_port", str(PORT), *cmd[i + 2:]]


class RunJob:
    """What one SLURM task runs: the run's process(es), its output appended to the run's log. On pre-emption
    (SIGUSR1, which SLURM also sends the run itself) submitit calls `checkpoint`: the run saves and exits, and
    the same command is requeued."""

    def __init__(self, job: Job, gpus_per_node: int, nodes: int) -> None:
        self.job, self.gpus_per_node, self.nodes = Job(job.key, job.argv, job.stage, log=job.log), gpus_per_node, nodes
        self.proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        cmd = node_command(self.job, self.gpus_per_node, self.nodes)
        with open(self.job.log, "a") as f:
            f.write(f"# SLURM job {os.environ.get('SLURM_JOB_ID')}: {shown(cmd)}\n")
            f.flush()
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            while (code := self.proc.poll()) is None:  # not wait(): its lock would deadlock `checkpoint`,
                time.sleep(0.5)  # which runs as a signal handler in this thread
        if code:
            raise RuntimeError(last_error(self.job.log, code))
        return self.job.key

    def checkpoint(self):  # submitit's pre-emption hook
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                pass
            while self.proc.poll() is None:
                time.sleep(0.5)
        return submitit.helpers.DelayedSubmission(RunJob(self.job, self.gpus_per_node, self.nodes))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "proc": None}


def executor(args: argparse.Namespace, folder: Path):
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # the signal runs save on (submitit reads it at import)
    try:
        import submitit
    except ImportError:
        raise SystemExit("livt compare --launcher slurm needs submitit: pip install 'livt[cluster]'") from None
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=1000)
    params = {"time": time_minutes(args.slurm_time), "nodes": args.slurm_nodes, "ntasks_per_node": 1,
              "cpus_per_task": cpus_per_task(args), "signal_delay_s": args.slurm_signal_delay}
    if args.slurm_gpus_per_node:
        params["gpus_per_node"] = args.slurm_gpus_per_node
    params.update({name: getattr(args, f"slurm_{name}") for name in ("partition", "account", "qos", "constraint",
                                                                      "mem") if getattr(args, f"slurm_{name}")})
    ex.update_parameters(**params)
    return ex


def job_state(job_id: str) -> str:
    """SLURM's state of a job: '' once the controller has forgotten it, UNKNOWN while it does not answer."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "UNKNOWN"
    if out.returncode:
        return "" if "Invalid job id" in out.stderr else "UNKNOWN"
    return next((tok.split("=", 1)[1] for tok in out.stdout.split() if tok.startswith("JobState=")), "UNKNOWN")


def recorded(job: Job) -> dict:
    try:
        return json.loads((Path(job.key) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def dry_run(cmp: Comparison, args: argparse.Namespace) -> None:
    """Print every job (submit / reuse / follow), its sbatch options, dependencies and command; submit nothing."""
    classify(cmp.jobs, current_commit(), args.rerun_stale)
    say(f"plan: {len(cmp.jobs)} SLURM jobs for {len(cmp.rows)} rows; every job: sbatch "
        f"{' '.join(sbatch_options(args))}")
    for job in cmp.jobs.values():  # dependencies first: the planner adds them before their dependents
        old = recorded(job).get("job_id", "")
        what = "reuse" if job.status == "reused" else f"follow (SLURM job {old})" if old else "submit"
        say(f"{what:8s} {Path(job.key).name} ({job.stage}){' (' + job.note + ')' if job.note else ''}")
        if job.status == "pending":
            say(f"    after: {', '.join('afterok:' + Path(d).name for d in job.deps) or '-'}")
            cmd = node_command(job, args.slurm_gpus_per_node, args.slurm_nodes, "$SLURM_NODEID", "FIRST_NODE")
            say(f"    {shown(cmd)}")
    for row in cmp.rows:
        if row.error:
            say(f"failed   {row.method} seed {row.seed}: {row.error}")


def submit(cmp: Comparison, args: argparse.Namespace, logs: Path) -> None:
    """Submit every job not finished and not already queued, dependencies first (afterok)."""
    check(args)
    logs.mkdir(parents=True, exist_ok=True)
    extra = extra_options(args)
    ex = executor(args, logs / "slurm")
    classify(cmp.jobs, current_commit(), args.rerun_stale)
    ids: dict[str, str] = {}
    for job in cmp.jobs.values():  # dependencies first (the planner's order)
        if job.status == "reused":
            say_reused(job)
            continue
        if any(cmp.jobs[d].status == "failed" for d in job.deps):
            job.status, job.error = "failed", "a run it depends on failed"
            continue
        old = recorded(job).get("job_id", "")
        if old and job_state(old) in ACTIVE:
            ids[job.key] = old
            say(f"queued   {Path(job.key).name} (SLURM job {old}, submitted before)")
            continue
        deps = [ids[d] for d in job.deps if d in ids]
        kill = {"kill_on_invalid_dep": "yes"} if deps else {}  # a failed dependency cancels, not blocks
        ex.update_parameters(job_name=Path(job.key).name, dependency=f"afterok:{':'.join(deps)}" if deps else None,
                             additional_parameters={**extra, **kill})
        job.log = logs / f"{Path(job.key).name}.log"
        try:
            handle = ex.submit(RunJob(job, args.slurm_gpus_per_node, args.slurm_nodes))
        except Exception as e:  # noqa: BLE001 -- sbatch refused this one job: name it, go on with the others
            job.status, job.error = "failed", f"sbatch: {str(e).strip().splitlines()[-1][:300]}"
            say(f"failed   {Path(job.key).name}: {job.error}")
            continue
        ids[job.key] = handle.job_id
        Path(job.key).mkdir(parents=True, exist_ok=True)
        (Path(job.key) / STATE_FILE).write_text(json.dumps({"job_id": handle.job_id, "log": str(job.log)}))
        say(f"submitted {Path(job.key).name} ({job.stage}): SLURM job {handle.job_id}"
            + (f" after {','.join(deps)}" if deps else ""))
    for key in ids:
        cmp.jobs[key].status = "running"
    if ids:
        say(f"follow: squeue -j {','.join(ids.values())}; logs in {logs}/")


def settle(jobs: dict[str, Job], final: bool) -> int:
    """Each job's status from its files and SLURM; returns how many are still queued or running (with `final`
    those are marked failed: 'still pending (SLURM job N)')."""
    active = 0
    for job in jobs.values():
        if job.status in ("reused", "done"):
            continue
        rec = recorded(job)
        if not rec:
            if job.status != "failed":
                job.status, job.error = "failed", "not submitted"
            continue
        state = job_state(rec["job_id"])
        if state in ACTIVE:
            active += 1
            job.status = "running"
            if final:
                job.status, job.error = "failed", f"still {state.lower()} (SLURM job {rec['job_id']})"
        elif job.done_file.is_file():
            job.status = "done"
        elif state == "CANCELLED" and "Dependency" in scontrol("scontrol", "show", "job", rec["job_id"]).stdout:
            job.status, job.error = "failed", "a run it depends on failed"
        else:
            job.status, job.error = "failed", last_error(Path(rec["log"]), state or "unknown")
    return active


def follow(jobs: dict[str, Job], poll: float = 2.0) -> None:
    """One line per run as it finishes, until none is queued or running."""
    said: set[str] = set()
    while True:
        active = settle(jobs, final=False)
        for job in jobs.values():
            if job.status in ("done", "failed") and job.key not in said:
                said.add(job.key)
                say(f"{job.status:8} [{len(said)}/{len(jobs)}] {Path(job.key).name}"
                    + (f": {job.error}" if job.error else ""))
        if not active:
            return
        time.sleep(poll)


def collect(cmp: Comparison) -> None:
    """--collect: the state of every job, nothing submitted; unfinished runs are marked in the table."""
    classify(cmp.jobs, current_commit(), rerun_stale=False)
    settle(cmp.jobs, final=True)


def main(cmp: Comparison, args: argparse.Namespace, logs: Path) -> bool:
    """Dry run, collect, or submit (and with --wait follow); True when the table should be written now."""
    if args.dry_run:
        dry_run(cmp, args)
        return False
    if args.collect:
        collect(cmp)
        return True
    submit(cmp, args, logs)
    if not any(job.status == "running" for job in cmp.jobs.values()):
        return True  # nothing queued: every run finished (or failed) already
    if not args.wait:
        say("the same command with --wait follows them; with --collect it writes the table of what finished")
        return False
    follow(cmp.jobs)
    return True
