"""Stage 2 of LiVT: Balanced Fine-Tuning (Bal-BCE by default) and evaluation.

    python finetune_bft.py --data demo --pretrained checkpoints/<pretrain run>/encoder.safetensors
    accelerate launch finetune_bft.py --data imagenet_lt --data.root /data/imagenet --pretrained ...
    python finetune_bft.py --data imagenet_lt --eval_only --checkpoint classifier.safetensors
    python finetune_bft.py --help                          # every key, one line each

Writes checkpoints/<run>/classifier.safetensors and test_results.{json,md}.
"""

from livt.finetune import main

if __name__ == "__main__":
    main()
