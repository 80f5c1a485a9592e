"""Turn what benchmarks/gpu_all.sh left in $OUT into the markdown blocks of BENCHMARKS.md and RESULTS.md.

    python benchmarks/gpu_tables.py $OUT          # writes $OUT/tables.md (and prints it)

Reads $OUT/results.tar.gz (machine.txt, status.tsv, smoke.jsonl, bench.md/json, input_pipeline_*px.md,
study/comparison.md/json). Each block names the machine, date, commit and command, so a GPU session pastes
them in place of the "to be measured" sections and commits. A part that produced nothing is named as missing.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

SMOKE_CHECKS = ("cuda", "stages", "compile", "nonfinite", "resume", "accelerate", "compare")
PARTS = ("setup", "smoke", "speed", "study")
COMMAND = "OUT=$OUT bash benchmarks/gpu_all.sh"


def read_results(out: Path) -> dict[str, str]:
    """The text files of results.tar.gz by their path inside it (results/... and logs/...)."""
    files: dict[str, str] = {}
    with tarfile.open(out / "results.tar.gz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[member.name] = tar.extractfile(member).read().decode("utf-8", "replace")
    return files


def machine_info(text: str) -> dict[str, str]:
    """machine.txt: the GPU line first, then 'key value' lines (cpus, torch, commit, date)."""
    lines = text.splitlines()
    info = {"gpu": lines[0] if lines else "unknown"}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        info[key] = value
    return info


def provenance(info: dict[str, str], command: str) -> str:
    return (f"- machine: {info['gpu']}, {info.get('cpus', '?')} CPUs; torch {info.get('torch', '?')}\n"
            f"- date: {info.get('date', '?')}; commit: {info.get('commit', '?')}\n- command: `{command}`")


def smoke_table(text: str) -> str:
    rows = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["check"]] = row
    out = ["| check | result | device | precision | seconds | detail |", "|---|---|---|---|---:|---|"]
    for check in SMOKE_CHECKS:
        r = rows.get(check)
        if r is None:
            out.append(f"| {check} | **missing** | | | | the check did not report |")
        else:
            detail = r["detail"].replace("|", "/").replace("\n", " ")[:300]
            out.append(f"| {check} | {'pass' if r['ok'] else '**FAIL**'} | {r['device']} | {r['precision']} | "
                       f"{r['seconds']} | {detail} |")
    return "\n".join(out)


def status_table(text: str) -> str:
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    seen = {r[0]: r for r in rows}
    out = ["| part | exit | seconds | limit (s) |", "|---|---:|---:|---:|"]
    for part in PARTS:
        r = seen.get(part)
        out.append(f"| {part} | {r[1]} | {r[2]} | {r[3]} |" if r else f"| {part} | **missing** | | |")
    return "\n".join(out)


def section(files: dict[str, str], name: str, missing: str) -> str:
    return files.get(f"results/{name}", "").strip() or f"**missing**: {missing} (see the part's log)"


def tables(out: Path) -> str:
    files = read_results(out)
    info = machine_info(files.get("results/machine.txt", ""))
    pipelines = sorted(k for k in files if k.startswith("results/input_pipeline_") and k.endswith(".md"))
    bench = [
        "<!-- BENCHMARKS.md -->",
        f"## GPU: the CUDA smoke of every code path ({info['gpu']})", "",
        provenance(info, COMMAND + "   (part 1, benchmarks/gpu_smoke.py)"), "",
        smoke_table(files.get("results/smoke.jsonl", "")), "",
        f"## GPU: ViT-B/16, 224 px, batch 256 ({info['gpu']})", "",
        provenance(info, COMMAND + "   (part 2, livt bench --compile --jpeg-root ...)"), "",
        section(files, "bench.md", "livt bench wrote no bench.md"), "",
        "## GPU machine's host CPU: the training-image pipeline per core", "",
        provenance(info, COMMAND + "   (part 2, benchmarks/input_pipeline.py)"), "",
        *([files[k].strip() for k in pipelines] or ["**missing**: input_pipeline wrote no table"]), "",
        "Parts of the call:", "", status_table(files.get("results/status.tsv", "")),
    ]
    results = [
        "<!-- RESULTS.md -->",
        f"## 4. CIFAR-10-LT (imbalance 100), GPU scale ({info['gpu']})", "",
        provenance(info, COMMAND + "   (part 3: the livt compare command below)"), "",
        section(files, "study/comparison.md", "livt compare wrote no comparison.md"),
    ]
    return "\n".join(bench) + "\n\n" + "\n".join(results) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the $OUT folder of benchmarks/gpu_all.sh")
    args = p.parse_args(argv)
    text = tables(args.out)
    (args.out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
