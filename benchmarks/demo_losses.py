"""Compare the losses (and MGP against random initialisation) on the built-in demo data.

    python benchmarks/demo_losses.py --out /tmp/demo_losses            # CPU, 2 cores: about 20 minutes
    python benchmarks/demo_losses.py --out /tmp/p4 --losses bal_bce -- --model.patch_size 4 --optim.epochs 60

Pretrains one encoder with `pretrain_mgp.py --data demo`, fine-tunes it with each loss for each seed
(`finetune_bft.py --data demo --loss.name ...`), fine-tunes the same architecture from random weights
with Bal-BCE under the same budget, and prints one markdown row per (start, loss): mean and spread
over the seeds of test top-1, many / medium / few-shot accuracy and ECE. Arguments after `--` are
config overrides given to both stages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KEYS = ("top1", "many", "medium", "few", "ece")


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / script), "--data", "demo", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/demo_losses")
    p.add_argument("--losses", default="ce,bce,bal_ce,bal_bce")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("overrides", nargs="*", help="--key value overrides for both stages (after --)")
    args = p.parse_args()
    out, seeds = Path(args.out), args.seeds.split(",")
    run("pretrain_mgp.py", "--output_dir", str(out), "--run_name", "mgp", "--resume", "auto", *args.overrides)
    encoder = out / "mgp" / "encoder.safetensors"
    plan = [("MGP", loss, ["--pretrained", str(encoder)]) for loss in args.losses.split(",")]
    plan.append(("random init", "bal_bce", ["--from_scratch"]))
    print("| start | loss | seeds | top-1 | many | medium | few | ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for start, loss, extra in plan:
        rows = []
        for seed in seeds:
            name = f"{'mgp' if start == 'MGP' else 'scratch'}-{loss}-s{seed}"
            run("finetune_bft.py", "--output_dir", str(out), "--run_name", name, "--resume", "auto",
                "--loss.name", loss, "--seed", seed, *extra, *args.overrides)
            rows.append(json.loads((out / name / "test_results.json").read_text()))
        cells = []
        for k in KEYS:
            v = np.array([r[k] if r[k] is not None else np.nan for r in rows], dtype=float)
            cells.append(f"{np.mean(v):.1f} ± {np.std(v):.1f}")
        print(f"| {start} | {loss} | {len(seeds)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
