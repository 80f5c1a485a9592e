#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (H200/H100: about 4 minutes), tables under $OUT:
#     OUT=/tmp/bench bash benchmarks/gpu_all.sh
#     OUT=/tmp/bench TINY=1 bash benchmarks/gpu_all.sh      # the same on the CPU with tiny sizes (a check)
# 1. a JPEG tree (~80 KB 500x375 files, 100 classes, long-tailed) generated here, on local disk;
# 2. benchmarks/input_pipeline.py: the training-image pipelines per CPU core (reference PIL, data.pipeline
#    fast / draft, data.uint8_batches) and their PSNR to the reference, 224 px (~15 s, CPU only);
# 3. livt bench: ViT-B/16 224 px batch 256, MGP and BFT, reference step vs livt's step eager and with
#    regional torch.compile, model only, from on-device data and end to end from the JPEG tree, through the
#    PIL transforms and through data.pipeline fast + data.uint8_batches.
set -euo pipefail
OUT=${OUT:?set OUT to the folder for the tables}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=.
TREE=${TREE:-$(mktemp -d)/jpeg_lt}
if [[ -n "${TINY:-}" ]]; then
  python3 benchmarks/jpeg_tree.py "$TREE" --classes 5 --max-per-class 40 --imbalance 4 --eval-per-class 2
  SIZE=(--tiny --jpeg-classes 5)
  PIPE=(--images 16 --rounds 1 --psnr-images 4)
  IMGS=(32)
else
  python3 benchmarks/jpeg_tree.py "$TREE" --classes 100 --max-per-class 320 --imbalance 32 --eval-per-class 2
  WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
  SIZE=(--jpeg-classes 100 --workers "$WORKERS" --steps 20 --warmup 5)
  PIPE=(--images 128 --rounds 3 --psnr-images 50)
  IMGS=(224)
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true; nproc; } > "$OUT/machine.txt"
for IMG in "${IMGS[@]}"; do
  python3 benchmarks/input_pipeline.py "$TREE" --img "$IMG" "${PIPE[@]}" --out "$OUT" 2>&1 | tee -a "$OUT/input_pipeline.log"
done
python3 -m livt.cli bench "${SIZE[@]}" --compile --jpeg-root "$TREE" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
