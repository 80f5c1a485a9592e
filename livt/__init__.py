"""livt: Vision Transformers trained from scratch on long-tailed data with the LiVT recipe
(Masked Generative Pretraining, then Balanced Fine-Tuning). Entry points: pretrain_mgp.py, finetune_bft.py."""

__version__ = "0.1.0"
