#!/usr/bin/env bash
# All of livt's GPU evidence in one call of one H100 / H200 (planned 8.5 minutes wall, under the device tool's
# 10-minute limit per call), everything under $OUT:
#     python benchmarks/pack_cifar10_lt.py                       # once, here: data_carry/cifar10_lt (49 MiB)
#     set -o pipefail; LIVT_COMMIT=<sha> bash benchmarks/gpu_all.sh 2>&1 | tee $OUT/call.log   # the device call,
#                                                            # carry ["data_carry"] (BENCHMARKS.md, "The GPU call")
#     OUT=/tmp/gpu TINY=1 bash benchmarks/gpu_all.sh             # the same call on the CPU, tiny (CI: tests/test_gpu_call.py)
#     python benchmarks/gpu_tables.py $OUT                       # -> $OUT/tables.md: the BENCHMARKS.md / RESULTS.md blocks
# Parts and their planned minutes (each under its own time limit, logged, and the next part runs whatever
# happens; the exit code is non-zero if any part failed):
#   0. setup      0.5  machine.txt; the JPEG tree of the speed tables (benchmarks/jpeg_tree.py, local disk)
#   1. smoke      2.0  benchmarks/gpu_smoke.py, bf16 on CUDA, the tiny preset, the six checks at once (the
#                      longest, --compile: two processes of ~40 s of inductor each): CUDA
#                      present; both stages eager on data.on_device; both stages with --compile; a NaN step
#                      skipped (weights, AdamW moments and step count unchanged); SIGKILL + --resume auto equal to
#                      the straight run; accelerate launch; livt compare with two methods
#   2. speed      3.0  benchmarks/input_pipeline.py (224 px, per CPU core) and livt bench (ViT-B/16 224 px batch
#                      256, MGP and BFT, reference vs livt eager vs regional compile, model only / on_device / JPEG)
#   3. study      3.0  CIFAR-10-LT x100 at 32 px, one seed, data.on_device, `livt compare --data cifar10_lt_gpu`:
#                      MGP 50 epochs (ViT-S/4, planned <= 45 s: 2,450 steps of batch 256 at <= 15 ms), then
#                      7 rows at once (--jobs 7), 20 epochs each (--epochs 20): Bal-BCE, Bal-CE, CE, BCE from
#                      MGP, Bal-BCE from scratch, ResNet-32 Bal-CE and LDAM-DRW on their own (SGD, pad-crop)
#                      recipe compressed to 20 epochs. Planned <= 120 s for the rows: a ViT-S/4 epoch is
#                      12,406 x ~8.6 GFLOP = 107 TFLOP (+ 29 TFLOP of test), ~0.7 s at a conservative
#                      200 TFLOP/s (a quarter of the H200's ~790 bf16), x 5 rows x 20 epochs = 70 s; a ResNet-32
#                      epoch is 97 launch-bound steps, <= 1 s.
#   4. tables     0.0  benchmarks/gpu_tables.py $OUT (seconds)
#   total         8.5  (each part also has a hard time limit, LIMIT below: 40 + 150 + 180 + 180 = 550 s)
# $OUT gets at most 8 files (the device tool's limit): tables.md, status.tsv, results.tar.gz (every log, table,
# metrics.jsonl and config of the parts; no checkpoints), refreshed after every part so a call cut short keeps
# what was done.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1  # the repository itself, no install (the GPU machine has no network)
export WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK/logs" "$WORK/results"
TREE=$WORK/jpeg_lt
STATUS=$OUT/status.tsv
if [[ -n "${TINY:-}" ]]; then
  LIMIT=(60 180 120 180)  # setup smoke speed study, seconds: generous on a loaded CPU
  # inductor on a CPU takes ~50 s per process: --compile still goes through livt's path (compile_blocks,
  # Module.compile) but torch runs the blocks eagerly; set TINY_COMPILE=1 to compile for real
  [[ -n "${TINY_COMPILE:-}" ]] || export TORCH_COMPILE_DISABLE=1
  DATA=$WORK/data_carry/cifar10_lt
  STUDY=(--data cifar10_lt_cpu --epochs 1 --pretrain-args "--optim.epochs 1 --optim.warmup_epochs 0")
  STUDY_SHARED=(--aug.pad 2 --data.batch_size 32 --optim.batch_size 32)
  METHODS=bal_bce,bal_bce@scratch,resnet_bal_ce  # one of each kind (ViT from MGP, from scratch, CNN): CI time
else
  LIMIT=(40 150 180 180)  # hard caps, 550 s in all: a part that overruns its plan cannot push the call past 600 s
  DATA=${DATA:-data_carry/cifar10_lt}
  STUDY=(--data cifar10_lt_gpu --epochs 20 --jobs 7)
  STUDY_SHARED=()
  METHODS=bal_bce,bal_ce,ce,bce,bal_bce@scratch,resnet_bal_ce,ldam_drw
fi
FAILED=0

collect() {  # every result and log so far into $OUT/results.tar.gz (small files only, no checkpoints)
  cp "$STATUS" "$WORK/results/status.tsv"
  (cd "$WORK" && find results logs -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.log' \
     -o -name '*.csv' -o -name '*.txt' -o -name '*.tsv' -o -name '*.yaml' \) -size -8M -print0 \
     | tar -czf "$OUT/results.tar.gz.tmp" --null -T - && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz")
}

part() {  # part NAME LIMIT_S: run the function NAME in a process of its own under a time limit, log, record
  local name=$1 limit=$2 t0=$SECONDS rc
  echo "=== $name (limit ${limit} s) ===" | tee -a "$WORK/logs/$name.log"
  timeout --kill-after=10 "$limit" bash "$SELF" "$name" >> "$WORK/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$STATUS"
  [[ $rc == 0 ]] || { FAILED=1; echo "!!! $name failed (exit $rc): last lines of its log:"; tail -n 20 "$WORK/logs/$name.log"; }
  echo "--- $name: exit $rc, $((SECONDS - t0)) s"
  collect
}

setup() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    echo "cpus $(env -u OMP_NUM_THREADS nproc)"; python3 -c 'import torch, accelerate, timm
print("torch", torch.__version__, "accelerate", accelerate.__version__, "timm", timm.__version__)'
    # the device machine's copy of the tree may have no .git: the caller names the commit (LIVT_COMMIT)
    echo "commit ${LIVT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "date $(date -u +%Y-%m-%dT%H:%MZ)"; } > "$WORK/results/machine.txt"
  cp "$WORK/results/machine.txt" "$OUT/machine.txt"
  if [[ -n "${TINY:-}" ]]; then
    python3 benchmarks/jpeg_tree.py "$TREE" --classes 5 --max-per-class 40 --imbalance 4 --eval-per-class 2
    # a CIFAR-format stand-in (100 training images per class), packed the way data_carry is
    python3 - "$WORK/cifar_full" <<'EOF'
import sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(0)
for split, n in (("train", 100), ("test", 4)):
    labels = np.repeat(np.arange(10), n)
    np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels=labels)
EOF
    python3 benchmarks/pack_cifar10_lt.py --root "$WORK/cifar_full" --out "$DATA"
  else
    python3 benchmarks/jpeg_tree.py "$TREE" --classes 100 --max-per-class 320 --imbalance 32 --eval-per-class 2
  fi
  [[ -f $DATA/train.npz && -f $DATA/test.npz ]] || { echo "no packed CIFAR-10-LT in $DATA (run benchmarks/pack_cifar10_lt.py and carry data_carry)"; return 1; }
}

smoke() {  # the checks in groups run at once (GPU: all six, 16 CPU cores; TINY: two at a time); smoke.jsonl
  local rc=0 pids=() group groups=("stages compile nonfinite resume accelerate compare")
  [[ -z "${TINY:-}" ]] || groups=("stages compile" "nonfinite resume" "accelerate compare")
  python3 benchmarks/gpu_smoke.py cuda --work "$WORK/results" || return 1  # no GPU: nothing else is worth running
  for group in "${groups[@]}"; do
    pids=()
    for check in $group; do python3 benchmarks/gpu_smoke.py "$check" --work "$WORK/results" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  done
  mv "$WORK"/results/smoke_*.log "$WORK/logs/" 2>/dev/null
  return $rc
}

speed() {
  local img pipe size
  if [[ -n "${TINY:-}" ]]; then
    size=(--tiny --jpeg-classes 5); pipe=(--images 16 --rounds 1 --psnr-images 4); img=32
  else
    local cpus; cpus=$(env -u OMP_NUM_THREADS nproc)
    local workers=$(( cpus > 2 ? cpus - 2 : 1 ))
    size=(--jpeg-classes 100 --workers "$workers" --steps 20 --warmup 5); pipe=(--images 128 --rounds 3 --psnr-images 50); img=224
  fi
  python3 benchmarks/input_pipeline.py "$TREE" --img "$img" "${pipe[@]}" --out "$WORK/results" || return 1
  python3 -m livt.cli bench "${size[@]}" --compile --jpeg-root "$TREE" --out "$WORK/results"
}

study() {
  local rc
  python3 -m livt.cli compare "${STUDY[@]}" --pretrained mgp --seeds 0 \
    --methods "$METHODS" \
    --output_dir "$WORK/runs" --out "$WORK/results/study" -- --data.root "$DATA" "${STUDY_SHARED[@]}"
  rc=$?
  for run in "$WORK"/runs/*/; do  # each run's config and metrics (no checkpoints) travel in the tar
    mkdir -p "$WORK/logs/runs/$(basename "$run")"
    cp "$run"/{config.yaml,metrics.jsonl,test_results.json} "$WORK/logs/runs/$(basename "$run")/" 2>/dev/null
  done
  return $rc
}

if [[ -n ${1:-} ]]; then "$1"; exit $?; fi  # bash gpu_all.sh PART: one part (what `part` runs)
printf 'part\texit\tseconds\tlimit_s\n' > "$STATUS"
part setup "${LIMIT[0]}"
part smoke "${LIMIT[1]}"
part speed "${LIMIT[2]}"
part study "${LIMIT[3]}"
python3 benchmarks/gpu_tables.py "$OUT" || FAILED=1
cat "$STATUS"
[[ $FAILED == 0 ]] && echo "gpu_all: every part passed; tables in $OUT/tables.md" || echo "gpu_all: a part FAILED (see status.tsv)"
exit $FAILED
