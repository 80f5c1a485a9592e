"""Stage 1 of LiVT: Masked Generative Pretraining.

    python pretrain_mgp.py --data demo                     # CPU, a few minutes, built-in data
    accelerate launch pretrain_mgp.py --data imagenet_lt --data.root /data/imagenet
    python pretrain_mgp.py --help                          # every key, one line each

Writes checkpoints/<run>/encoder.safetensors, the input of finetune_bft.py --pretrained.
"""

import sys

from livt.cli import main

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]])
