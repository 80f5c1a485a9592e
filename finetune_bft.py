"""Stage 2 of LiVT: Balanced Fine-Tuning (Bal-BCE by default) and evaluation.

    python finetune_bft.py --data demo --pretrained checkpoints/<pretrain run>/encoder.safetensors
    accelerate launch finetune_bft.py --data imagenet_lt --data.root /data/imagenet --pretrained ...
    livt evaluate --data imagenet_lt --checkpoint classifier.safetensors  # a saved classifier (livt.evaluate)
    livt stage2 --data tiny --method crt --init_classifier <stage-1 run>/classifier.safetensors  # livt.stages
    python finetune_bft.py --help                          # every key, one line each

Writes checkpoints/<run>/classifier.safetensors and test_results.{json,md}.
"""

import sys

from livt.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
