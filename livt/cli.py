"""The `livt` command: one entry point, one subcommand per tool.

    livt pretrain [--data PRESET] [--key value ...]            Masked Generative Pretraining
    livt finetune [--data PRESET] [--method NAME] [...]        fine-tuning (BFT and every method)
    livt stage2 --method crt --init_classifier FILE [...]      a second stage on a frozen backbone
    livt evaluate --checkpoint FILE [--data PRESET] [...]      a saved classifier on the test split
    livt compare --data PRESET --methods a,b --seeds 0,1       runs methods x seeds, writes the table
    livt probe ENCODER [--data PRESET] [...]                   kNN / linear-probe accuracy of frozen features
    livt predict CLASSIFIER.safetensors IMAGE [...]            top-k classes of image files
    livt stats FILE                                            class counts, shot groups, imbalance
    livt bench [--tiny] [--compile] [--jpeg-root DIR]          throughput, MFU, x an in-process reference

`python pretrain_mgp.py ...` and `python finetune_bft.py ...` are the same as the first two, and
`accelerate launch pretrain_mgp.py ...` is how to run them on several GPUs.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("livt.pretrain", "Masked Generative Pretraining of a ViT encoder (MAE)"),
    "finetune": ("livt.finetune", "fine-tuning: Balanced Fine-Tuning and the other methods"),
    "stage2": ("livt.stages", "a second stage (cRT, tau-norm, LWS, NCM, MiSLAS, AFG) on a frozen backbone"),
    "evaluate": ("livt.evaluate", "a saved classifier on the test split (post-hoc, shifted test priors, SADE TTA)"),
    "compare": ("livt.compare", "train / evaluate methods x seeds and write the comparison table"),
    "probe": ("livt.probe", "kNN and linear-probe accuracy of an encoder's frozen features (or random weights)"),
    "predict": ("livt.predict", "top-k predictions of a fine-tuned classifier for image files"),
    "stats": ("livt.data.stats", "class counts, shot groups and imbalance of a split or count file"),
    "bench": ("livt.bench", "training-step throughput of both stages against an in-process reference step"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: livt COMMAND [ARGS ...]   (livt COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"livt: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        module.main(rest)
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"livt {name}: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def is_user_error(e: Exception) -> bool:
    """A bad config, data file, checkpoint or run directory, or a run stopped by non-finite steps: its message
    says what to change, so the command prints it without a traceback. (Imported here: their modules are
    loaded whenever one of them was raised.)"""
    from livt.checkpoint import CheckpointError
    from livt.config import ConfigError
    from livt.data.errors import DataError
    from livt.engine import NonFiniteError, RunDirError

    return isinstance(e, (ConfigError, DataError, CheckpointError, RunDirError, NonFiniteError))


if __name__ == "__main__":
    main()
