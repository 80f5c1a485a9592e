"""`livt compare`: run methods x seeds on one dataset and write the comparison table (README: "Methods, and
comparing them", "Comparing on a GPU node or a cluster").

    livt compare --data tiny --methods ce,bal_ce,bal_bce --seeds 0          # seconds on a CPU
    livt compare --data cifar10_lt --methods bal_bce,crt --pretrained mgp --gpus 0,1,2,3 --gpus-per-run 2 \\
        --vary loss.tau=0.5,1,2 --dry-run -- --data.root ../shared/data/cifar10     # the plan, nothing run

Each (method, seed) is one run in its own process and its own hash-named run directory, after the runs it
depends on (MGP, a shared stage 1); finished runs are reused, interrupted ones resumed, failing ones named in
the table. The table is rebuilt from what the runs wrote: `<out>/comparison.{md,csv}`, `<out>/shot_groups.png`,
`<out>/per_class.png`, `<out>/logs/<run>.log` and `<out>/logs/jobs.json`. `--launcher slurm`: livt.cluster.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from livt import config as config_lib
from livt.engine import provenance
from livt.jobs import (
    Comparison,
    Job,
    Row,
    classify,
    command,
    current_commit,
    free_port,
    is_stale,
    job_env,
    last_error,
    results_of,
    say,
    say_reused,
    shown,
)
from livt.models.cnn import is_cnn

PRETRAIN_SHARED = ("data.", "model.name", "model.patch_size")  # shared overrides pretraining also takes
METRICS = ("top1", "many", "medium", "few", "head", "tail", "ece", "mce", "nll")
SCRATCH = "@scratch"


# ---------------------------------------------------------------------------------------------
# Planning: which processes to run


CHAIN = ("data.", "model.")  # --vary keys every stage of a row must share (its stage 1 and pretraining too)


def label(spec: str, combo: tuple[tuple[str, str], ...]) -> str:
    """bal_bce + ((loss.tau, 0.5),) -> 'bal_bce[tau=0.5]'."""
    return spec + ("[" + ",".join(f"{k.split('.')[-1]}={v}" for k, v in combo) + "]" if combo else "")


def base_method(name: str) -> str:
    return name.split("[")[0].removesuffix(SCRATCH)


def tokens(combo) -> list[str]:
    return [tok for k, v in combo for tok in (f"--{k}", v)]


class Planner:
    def __init__(self, args: argparse.Namespace, shared: list[str], processes: int = 1) -> None:
        self.args, self.shared, self.processes = args, shared, processes
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job) -> str:
        self.jobs.setdefault(job.key, job)
        return job.key

    def fit_processes(self, stage: str, argv: list[str]) -> list[str]:
        """With K processes per run the effective batch stays optim.batch_size: the micro-batch per process
        is lowered (to a divisor) only where data.batch_size x K does not divide it."""
        if self.processes == 1:
            return argv
        cfg, k = config_lib.parse_args(stage, argv), self.processes
        batch, micro = cfg.optim.batch_size, cfg.data.batch_size
        if batch % k:
            raise config_lib.ConfigError(f"--gpus-per-run {k}: optim.batch_size {batch} is not a multiple of {k}")
        if (batch // k) % micro:
            micro = max(d for d in range(1, micro + 1) if (batch // k) % d == 0)
            argv = [*argv, "--data.batch_size", str(micro)]
        return argv

    def encoder(self, chain_combo: tuple) -> tuple[str | None, str]:
        """The encoder file ViT rows start from and the job that makes it ('' when none)."""
        if self.args.pretrained != "mgp":
            return self.args.pretrained or None, ""
        key = self.pretrain_job(tokens(chain_combo))
        return str(Path(key) / "encoder.safetensors"), key

    def pretrain_job(self, extra: list[str] = ()) -> str:
        """The dataset's MGP pretraining (seed 0, shared by every ViT row), with the shared (and varied)
        data.* and model size / patch overrides, then --pretrain-args."""
        keep = [tok for flag, *value in flag_groups([*self.shared, *extra])
                if flag.split("=")[0].removeprefix("--").replace("-", "_").startswith(PRETRAIN_SHARED)
                for tok in (flag, *value)]
        argv = ["--data", self.args.data, "--output_dir", self.args.output_dir, *keep,
                *shlex.split(self.args.pretrain_args)]
        argv = self.fit_processes("pretrain", argv)
        run_dir = config_lib.run_dir(config_lib.parse_args("pretrain", argv), "pretrain")
        return self.add(Job(str(run_dir), argv, stage="pretrain"))

    def finetune_argv(self, command: str, method: str, seed: int, balanced: bool, scratch: bool, extra: list[str],
                      encoder: str | None) -> list[str]:
        """The arguments of a row's own run; `command` is finetune, or stage2 for a second-stage recipe (which
        starts from its stage 1's classifier: --init_classifier, added by `row`)."""
        argv = ["--data", self.args.data, "--method", method, "--seed", str(seed),
                "--output_dir", self.args.output_dir, *self.shared, *extra]
        if balanced:
            argv += ["--data.balanced", "true"]
        if self.args.epochs:
            argv += compressed_schedule(config_lib.parse_args(command, argv).optim, self.args.epochs)
        cfg = config_lib.parse_args(command, argv)  # a bad method or key fails here, for this row only
        if command == "finetune" and not (cfg.from_scratch or cfg.pretrained):
            if is_cnn(cfg.model.name) or scratch or encoder is None:
                argv += ["--from_scratch"]
            else:
                argv += ["--pretrained", encoder]
        return argv

    def row(self, spec: str, seed: int, balanced: bool = False, deps: tuple[str, ...] = (),
            combo: tuple[tuple[str, str], ...] = ()) -> Row:
        """The jobs of one row. A varied data.* / model.* key applies to the whole chain (stage 1 and
        pretraining must see the same data and backbone); any other varied key only to the row's own run,
        so stage-1 and pretraining runs stay shared between the values."""
        scratch = spec.endswith(SCRATCH)
        method = spec.removesuffix(SCRATCH)
        row = Row(label(spec, combo), seed, balanced)
        chain_combo = tuple((k, v) for k, v in combo if k.startswith(CHAIN))
        try:
            _, keys, about, _ = config_lib.read_method(method)
            command = "stage2" if "stage2" in keys else "finetune"
            chain = []
            if about.get("stage1"):  # stage 1 -> stage 2: the stage-2 run starts from stage 1's classifier
                stage1 = self.row(f"{about['stage1']}{SCRATCH if scratch else ''}", seed, balanced, deps,
                                  chain_combo)
                if stage1.error:
                    raise RuntimeError(f"stage 1 ({about['stage1']}): {stage1.error}")
                chain = stage1.jobs
            encoder, pretrain_key = self.encoder(chain_combo)
            argv = self.finetune_argv(command, method, seed, balanced, scratch, tokens(combo), encoder)
            if chain:
                argv += ["--init_classifier", str(Path(chain[-1]) / "classifier.safetensors")]
            argv = self.fit_processes(command, argv)
            cfg = config_lib.parse_args(command, argv)
            row.cnn = is_cnn(cfg.model.name)
            run_dir = str(config_lib.run_dir(cfg, command))
            needs = list(deps) + chain[-1:] + ([pretrain_key] if "--pretrained" in argv and pretrain_key else [])
            row.jobs = chain + [self.add(Job(run_dir, argv, stage=command, deps=needs))]
        except (config_lib.ConfigError, ValueError, RuntimeError, OSError) as e:
            row.error = str(e).splitlines()[0][:300]
        return row


def plan(args: argparse.Namespace, shared: list[str], methods: list[str], seeds: list[int],
         combos: list[tuple], processes: int = 1) -> Comparison:
    """Every job and row of the comparison (the one planning step of both launchers)."""
    planner = Planner(args, shared, processes)
    rows = [planner.row(m, s, combo=c) for m in methods for c in combos for s in seeds]
    ce_of: dict[str, str] = {}
    if args.relative:
        ce = {}
        for m in methods:  # A_v: plain CE on the same backbone family
            cnn = any(r.method.startswith(m) and r.cnn for r in rows)
            ce[m] = "resnet_ce" if cnn else ("ce@scratch" if m.endswith(SCRATCH) else "ce")
            ce_of.update({label(m, c): label(ce[m], c) for c in combos})
        for m in dict.fromkeys(methods + list(ce.values())):
            rows += [planner.row(m, s, balanced=True, combo=c) for c in combos for s in seeds]
    return Comparison(planner.jobs, rows, ce_of, seeds, processes)


def compressed_schedule(optim: config_lib.OptimConfig, epochs: int) -> list[str]:
    """Overrides that fit a recipe's schedule into `epochs`: warm-up and step milestones scale with it
    (loss schedules such as DRW and IB are fractions of training already)."""
    f = epochs / optim.epochs
    argv = ["--optim.epochs", str(epochs), "--optim.warmup_epochs", f"{optim.warmup_epochs * f:g}"]
    if optim.schedule == "step":
        argv += ["--optim.step_epochs", ",".join(str(max(1, round(e * f))) for e in optim.step_epochs)]
    return argv


def flag_groups(tokens: list[str]) -> list[list[str]]:
    """['--a', '1', '--b=2', '--c'] -> [['--a', '1'], ['--b=2'], ['--c']]."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("--") or not groups or "=" in groups[-1][0] or len(groups[-1]) > 1:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


# ---------------------------------------------------------------------------------------------
# Devices


@dataclass
class Devices:
    """The GPU ids runs may use (CUDA_VISIBLE_DEVICES values; empty on a CPU-only machine), handed out in
    disjoint sets of `per_run`. `cpu`: the ids are pretended (LIVT_FAKE_GPUS, tests) and runs go on the CPU."""

    ids: list[str] = field(default_factory=list)
    per_run: int = 1
    cpu: bool = True
    free: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(self.ids)

    @property
    def slots(self) -> int:
        return len(self.ids) // self.per_run if self.ids else 1

    def take(self) -> list[str] | None:
        if not self.ids:
            return []
        if len(self.free) < self.per_run:
            return None
        taken, self.free = self.free[:self.per_run], self.free[self.per_run:]
        return taken

    def give(self, ids: list[str]) -> None:
        self.free += ids


FAKE_GPUS = "LIVT_FAKE_GPUS"  # test hook: pretend this many GPUs (ids 0..N-1); their runs go on the CPU


def visible_gpus() -> tuple[list[str], bool]:
    """The GPU ids this process may hand out, and whether they are pretended (FAKE_GPUS)."""
    if os.environ.get(FAKE_GPUS):
        return [str(i) for i in range(int(os.environ[FAKE_GPUS]))], True
    import torch

    n = torch.cuda.device_count()
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (given[:n] if given else [str(i) for i in range(n)]), False


def devices_of(gpus: str, per_run: int) -> Devices:
    """--gpus / --gpus-per-run checked against the visible GPUs (SystemExit naming the option)."""
    visible, fake = visible_gpus()
    ids = visible
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        unknown = [g for g in ids if g not in visible]
        if unknown:
            raise SystemExit(f"livt compare: --gpus {gpus}: no GPU {', '.join(unknown)} on this machine "
                             f"(visible: {','.join(visible) or 'none'})")
        if len(set(ids)) != len(ids):
            raise SystemExit(f"livt compare: --gpus {gpus}: an id is given twice")
    if per_run < 1:
        raise SystemExit(f"livt compare: --gpus-per-run must be >= 1, got {per_run}")
    if per_run > max(1, len(ids)):
        raise SystemExit(f"livt compare: --gpus-per-run {per_run} is larger than the pool of {len(ids)} GPUs "
                         f"({'--gpus ' + gpus if gpus else 'all visible'})")
    return Devices(ids, per_run, cpu=fake or not ids)


# ---------------------------------------------------------------------------------------------
# Running


def dry_run(cmp: Comparison, devices: Devices, n_parallel: int, rerun_stale: bool) -> None:
    """Print every job (run / resume / reuse, stale or not), its command, devices and dependencies."""
    classify(cmp.jobs, current_commit(), rerun_stale)
    todo = [j for j in cmp.jobs.values() if j.status == "pending"]
    pool = (f"GPUs {','.join(devices.ids)}{' (pretended, on the CPU)' if devices.cpu else ''}, "
            f"{devices.per_run} per run" if devices.ids else "CPU")
    say(f"plan: {len(cmp.jobs)} runs for {len(cmp.rows)} rows: {len(todo)} to run, "
        f"{len(cmp.jobs) - len(todo)} reused; {pool}, {n_parallel} at once")
    serves: dict[str, list[str]] = {}
    for row in cmp.rows:
        for key in row.jobs:
            serves.setdefault(key, []).append(f"{row.method}{' (balanced data)' if row.balanced else ''} "
                                              f"seed {row.seed}")
    for job in cmp.jobs.values():
        what = "reuse" if job.status == "reused" else "resume" if job.note.startswith("resume") else "run"
        say(f"{what:8s} {Path(job.key).name}{' (' + job.note + ')' if job.note else ''}"
            f"  <- {', '.join(serves.get(job.key, ['pretraining']))}")
        if job.status == "pending":
            gpus = f"any {devices.per_run} of {','.join(devices.ids)}" if devices.ids else "CPU"
            say(f"    devices: {gpus}; after: {', '.join(Path(d).name for d in job.deps) or '-'}")
            k = devices.per_run if devices.ids else 1
            say(f"    {shown(command(job, k), job_env([], k, devices.cpu))}")
    for row in cmp.rows:
        if row.error:
            say(f"failed   {row.method} seed {row.seed}: {row.error}")


def run_jobs(jobs: dict[str, Job], n_parallel: int, logs: Path, rerun_stale: bool,
             devices: Devices | None = None) -> None:
    """Run the pending jobs, dependencies first, at most `n_parallel` at once, each on its own devices;
    one line per event."""
    devices = devices or Devices()
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    processes = devices.per_run if devices.ids else 1
    if n_parallel * processes > 1 and "OMP_NUM_THREADS" not in env:  # share the cores, not oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (n_parallel * processes)))
    classify(jobs, current_commit(), rerun_stale)
    for job in jobs.values():
        if job.status == "reused":
            say_reused(job)
    total = sum(j.status == "pending" for j in jobs.values())
    finished = 0
    while True:
        running = [j for j in jobs.values() if j.status == "running"]
        for job in running:
            code = job.proc.poll()
            if code is None:
                continue
            finished += 1
            job.ended = time.time()
            devices.give(job.devices)
            elapsed = job.ended - job.started
            if code == 0 and not job.done_file.is_file():  # never trust a prediction silently
                code = -1
                job.error = (f"finished without writing {job.done_file}: the run chose another directory than "
                             f"the planned one (a livt bug; see {job.log})")
            if code == 0:
                job.status = "done"
                say(f"done     [{finished}/{total}] {Path(job.key).name} in {elapsed:.0f} s")
            else:
                job.status, job.error = "failed", job.error or last_error(job.log, code)
                say(f"failed   [{finished}/{total}] {Path(job.key).name}: {job.error} (log: {job.log})")
        pending = [j for j in jobs.values() if j.status == "pending"]
        for job in pending:
            dep_status = [jobs[d].status for d in job.deps]
            if "failed" in dep_status:
                job.status, job.error = "failed", "a run it depends on failed"
                finished += 1
                say(f"failed   [{finished}/{total}] {Path(job.key).name}: {job.error}")
            elif all(s in ("done", "reused") for s in dep_status) and \
                    sum(j.status == "running" for j in jobs.values()) < n_parallel:
                ids = devices.take()
                if ids is None:
                    break
                launch(job, ids, processes, devices.cpu, logs, env)
                job.status = "running"
                on = f" on GPU {','.join(ids)}" if ids else ""
                say(f"running  {Path(job.key).name} ({job.stage}{on}{', ' + job.note if job.note else ''})")
        if not any(j.status in ("pending", "running") for j in jobs.values()):
            return
        time.sleep(0.2)


def launch(job: Job, ids: list[str], processes: int, cpu: bool, logs: Path, env: dict[str, str]) -> None:
    """Start `job` on the GPUs `ids` (CUDA_VISIBLE_DEVICES), its output into its log."""
    job.log, job.devices, job.started = logs / f"{Path(job.key).name}.log", ids, time.time()
    extra = job_env(ids, processes, cpu)
    cmd = command(job, processes, free_port() if processes > 1 else None)
    with open(job.log, "w") as f:
        f.write(shown(cmd, extra) + "\n")
        f.flush()
        job.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, **extra})


# ---------------------------------------------------------------------------------------------
# The table, from the run directories


def head_tail(run_dir: Path) -> tuple[float | None, float | None]:
    """Mean per-class accuracy of the most / least frequent half of the classes (by training count)."""
    try:
        rows = list(csv.DictReader(io.StringIO((run_dir / "test_per_class.csv").read_text())))
    except OSError:
        return None, None
    rows.sort(key=lambda r: -int(r["train_count"]))
    acc = [float(r["accuracy"]) if r["accuracy"] else np.nan for r in rows]
    half = len(acc) // 2
    if half == 0:
        return None, None
    return float(np.nanmean(acc[:half])), float(np.nanmean(acc[-half:]))


def run_record(run_dir: Path) -> dict[str, Any]:
    """Metrics and budget of one finished run, read from its files."""
    res = results_of(run_dir) or {}
    head, tail = head_tail(run_dir)
    budget = res.get("budget") or {}
    return {"top1": res.get("top1"), "many": res.get("many"), "medium": res.get("medium"),
            "few": res.get("few"), "head": head, "tail": tail, "ece": res.get("ece"), "mce": res.get("mce"),
            "nll": res.get("nll"), "epochs": budget.get("epochs"), "images_seen": budget.get("images_seen"),
            "train_seconds": budget.get("train_seconds"), "selection": (res.get("selection") or {}).get("rule"),
            "posthoc_top1": (res.get("posthoc") or {}).get("top1"),
            "transductive_top1": (res.get("transductive") or {}).get("top1"), "results": res}


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)


def build_table(rows: list[Row], jobs: dict[str, Job], commit: str | None) -> list[dict[str, Any]]:
    """One entry per method: mean / std over its seeds of every metric, the budget, status and errors."""
    by_method: dict[tuple[str, bool], list[Row]] = {}
    for row in rows:
        by_method.setdefault((row.method, row.balanced), []).append(row)
    table = []
    for (method, balanced), group in by_method.items():
        records, errors, stale, seeds = [], [], False, []
        for row in group:
            failed = row.error or next((jobs[k].error for k in row.jobs if jobs[k].status == "failed"), "")
            if failed:
                errors.append(f"seed {row.seed}: {failed}")
                continue
            run_dir = Path(row.jobs[-1])
            rec = run_record(run_dir)
            if rec["top1"] is None:
                errors.append(f"seed {row.seed}: no results in {run_dir}")
                continue
            # a chained row spent its stage 1 too
            for k in row.jobs[:-1]:
                prev = run_record(Path(k))
                for b in ("epochs", "images_seen", "train_seconds"):
                    if rec[b] is not None and prev[b] is not None:
                        rec[b] += prev[b]
            stale |= is_stale(rec["results"], commit)
            records.append(rec)
            seeds.append(row.seed)
        entry: dict[str, Any] = {"method": method + (" (balanced data)" if balanced else ""),
                                 "method_name": base_method(method), "balanced": balanced,
                                 "seeds": seeds, "n_failed": len(errors), "errors": errors, "stale": stale,
                                 "per_seed_top1": [r["top1"] for r in records]}
        for m in (*METRICS, "posthoc_top1", "transductive_top1"):
            entry[m], entry[m + "_std"] = mean_std([r[m] for r in records])
        for b in ("epochs", "images_seen", "train_seconds"):
            entry[b] = mean_std([r[b] for r in records])[0]
        entry["selection"] = ", ".join(sorted({r["selection"] for r in records if r["selection"]}))
        entry["run_dirs"] = [str(Path(r.jobs[-1])) for r in group if r.jobs]
        table.append(entry)
    return table


def add_relative(table: list[dict[str, Any]], ce_of: dict[str, str]) -> None:
    """A_r = A_t / max(A_v, A_b) (survey Sec. 4.1) for every long-tailed row with its balanced runs."""
    by_name = {(e["method"].removesuffix(" (balanced data)"), e["balanced"]): e for e in table}
    for e in table:
        if e["balanced"]:
            continue
        a_t = e["top1"]
        a_b = by_name.get((e["method"], True), {}).get("top1")
        a_v = by_name.get((ce_of.get(e["method"], ""), True), {}).get("top1")
        if a_t is not None and a_b is not None and a_v is not None:
            e["relative"] = 100 * a_t / max(a_v, a_b)


def fmt(v: Any, std: Any = None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}" + (f" ± {std:.1f}" if std else "")
    return str(v)


def count(v: Any) -> str:
    return "n/a" if v is None else f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def markdown(table: list[dict[str, Any]], header: list[str]) -> str:
    cols = ["method", "seeds", "top-1", "many", "medium", "few", "head", "tail", "ECE", "MCE", "NLL"]
    extra = [("post-hoc top-1", "posthoc_top1"), ("transductive top-1", "transductive_top1"),
             ("A_r", "relative")]
    extra = [(name, key) for name, key in extra if any(e.get(key) is not None for e in table)]
    cols += [name for name, _ in extra] + ["epochs", "images seen", "train time (s)", "reported epoch"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    notes = []
    for e in table:
        name = e["method"] + (" (stale)" if e["stale"] else "")
        if e["errors"]:
            name += " (failed)" if not e["seeds"] else f" ({e['n_failed']} failed)"
            notes += [f"- {e['method']}: {err}" for err in e["errors"]]
        cells = [name, ",".join(map(str, e["seeds"])) or "-"]
        cells += [fmt(e[m], e[m + "_std"]) for m in METRICS]
        cells += [fmt(e.get(key), e.get(key + "_std")) for _, key in extra]
        cells += [count(e["epochs"]), count(e["images_seen"]), fmt(e["train_seconds"]), e["selection"] or "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Failed runs:", *notes]
    if any(e["stale"] for e in table):
        lines += ["", "(stale): reused from another commit or a tree with uncommitted changes; "
                      "`--rerun-stale` re-runs them."]
    lines += ["", "head / tail: mean per-class accuracy of the most / least frequent half of the classes. "
                  "Mean ± std over seeds."]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    keys = ["method", "seeds", *[k for m in METRICS for k in (m, m + "_std")], "posthoc_top1",
            "transductive_top1", "relative", "epochs", "images_seen", "train_seconds", "selection", "stale",
            "n_failed", "errors", "run_dirs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for e in table:
        w.writerow({**e, "seeds": " ".join(map(str, e["seeds"])), "errors": " | ".join(e["errors"]),
                    "run_dirs": " ".join(e["run_dirs"])})
    path.write_text(buf.getvalue())


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{platform.node()}: {dev}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# Command line


def list_methods() -> str:
    lines = ["| method | family | paper | summary | stage 1 |", "|---|---|---|---|---|"]
    for name in config_lib.methods():
        _, _, about, _ = config_lib.read_method(name)
        lines.append(f"| {name} | {about.get('family', '')} | {about.get('paper', '')} | "
                     f"{about.get('summary', '')} | {about.get('stage1', '')} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    shared: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, shared = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="livt compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="dataset preset (configs/finetune/NAME.yaml)")
    p.add_argument("--methods", default="", help="comma-separated method names (METHOD@scratch: ViT from scratch)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs at once (default: one per GPU slot, 1 on a CPU; on a CPU each gets cores / jobs "
                        "threads, and on a small CPU 1 is fastest)")
    p.add_argument("--gpus", default="", help="GPU ids the runs may use, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs per run; K > 1 runs through `accelerate launch --num_processes K` (same effective "
                        "batch)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="one row per value for each method, e.g. loss.tau=0.5,1,2 (several: every combination)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every job (run, resume, reuse), its command, devices and dependencies; run nothing")
    p.add_argument("--epochs", type=int, default=0,
                   help="compress every run's schedule to this many fine-tuning epochs")
    p.add_argument("--pretrained", default="", help="ViT encoder file, or 'mgp' to pretrain first ('' = scratch)")
    p.add_argument("--pretrain-args", default="", help="extra pretraining options, e.g. '--optim.epochs 50'")
    p.add_argument("--relative", action="store_true", help="also run the balanced data; report A_r")
    p.add_argument("--rerun-stale", action="store_true", help="re-run reused runs made by another commit")
    p.add_argument("--output_dir", default="checkpoints", help="root of the run directories")
    p.add_argument("--out", default="", help="where the table goes (default <output_dir>/compare-<data>)")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    from livt import cluster

    cluster.add_arguments(p)
    args = p.parse_args(argv)
    return args, shared


def parse_vary(specs: list[str], data: str) -> list[tuple[tuple[str, str], ...]]:
    """--vary KEY=V1,V2 (repeatable) -> every combination of values, each value checked by the config
    parser (SystemExit naming the option on an unknown key or a value of the wrong type)."""
    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key or not vals:
            raise SystemExit(f"livt compare: --vary {spec}: expected KEY=VALUE1,VALUE2,... (e.g. loss.tau=0.5,1,2)")
        if key in ("method", "data", "config", "seed", "output_dir", "run_name", "pretrained", "from_scratch",
                   "init_classifier"):
            raise SystemExit(f"livt compare: --vary {spec}: '{key}' is set by the runner; vary a recipe key")
        classifier = config_lib.flat_fields(config_lib.FinetuneConfig)
        command = "finetune" if key in classifier or key.startswith("loss.") else "stage2"  # decoupled.*
        for v in vals:
            try:
                config_lib.check_override(command, data, key, v)
            except config_lib.ConfigError as e:
                raise SystemExit(f"livt compare: --vary {spec}: {e}") from None
        axes.append([(key, v) for v in vals])
    return list(itertools.product(*axes))


def write_table(cmp: Comparison, args: argparse.Namespace, argv: list[str], out: Path, started: datetime) -> None:
    """comparison.{md,csv,json} and the figures under `out`, from what the run directories hold."""
    table = build_table(cmp.rows, cmp.jobs, current_commit())
    if args.relative:
        add_relative(table, cmp.ce_of)
    prov = provenance()
    header = [
        f"# livt compare: {args.data}",
        "",
        f"- command: `livt compare {' '.join(shlex.quote(a) for a in argv)}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"- commit: {prov['git_commit'] or 'unknown'}{' (uncommitted changes)' if prov['git_dirty'] else ''}",
        f"- seeds: {', '.join(map(str, cmp.seeds))}; runs under {args.output_dir}/",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(markdown(table, header))
    write_csv(table, out / "comparison.csv")
    (out / "comparison.json").write_text(json.dumps(table, indent=1, default=str))
    from livt import figures

    figures.plot_comparison(table, out / "shot_groups.png", out / "per_class.png")
    say(markdown(table, header))
    say(f"table in {out / 'comparison.md'}")


def write_jobs(cmp: Comparison, devices: Devices, path: Path) -> None:
    """What ran where: every job's status, devices, times and command (jobs.json beside the table)."""
    path.write_text(json.dumps([
        {"run_dir": j.key, "stage": j.stage, "status": j.status, "note": j.note, "error": j.error,
         "deps": j.deps, "devices": j.devices, "started": j.started, "ended": j.ended,
         "command": shown(command(j, cmp.processes), job_env(j.devices, cmp.processes, devices.cpu))}
        for j in cmp.jobs.values()], indent=1))


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    args, shared = parse(argv)
    if args.list:
        print(list_methods())
        return None
    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        raise SystemExit("livt compare: give --methods a,b,... (livt compare --list shows them)")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise SystemExit(f"livt compare: --seeds expects comma-separated integers, got '{args.seeds}'") from None
    slurm = args.launcher == "slurm"
    if slurm:  # bad input stops here, before any job starts
        from livt import cluster

        if args.gpus or args.gpus_per_run != 1 or args.jobs:
            raise SystemExit("livt compare: --gpus / --gpus-per-run / --jobs are for the local launcher; on SLURM "
                             "each run gets --slurm.gpus_per_node x --slurm.nodes GPUs")
        processes = cluster.processes(args)
    else:
        if args.wait or args.collect:
            raise SystemExit("livt compare: --wait / --collect are for --launcher slurm")
        devices = devices_of(args.gpus, args.gpus_per_run)
        processes = devices.per_run if devices.ids else 1
    combos = parse_vary(args.vary, args.data)
    out = Path(args.out or Path(args.output_dir) / f"compare-{args.data}")
    started = datetime.now(timezone.utc)

    cmp = plan(args, shared, methods, seeds, combos, processes)
    for row in cmp.rows:
        if row.error and not args.dry_run:
            say(f"failed   {row.method} seed {row.seed}: {row.error}")
    if slurm:
        if not cluster.main(cmp, args, out / "logs"):
            return None
    elif args.dry_run:
        dry_run(cmp, devices, args.jobs or devices.slots, args.rerun_stale)
        return None
    else:
        run_jobs(cmp.jobs, max(1, args.jobs or devices.slots), out / "logs", args.rerun_stale, devices)
        write_jobs(cmp, devices, out / "logs" / "jobs.json")
    write_table(cmp, args, argv, out, started)
    return out

if __name__ == "__main__":
    main()
