"""``lmstack train pretrain|sft|lora|qlora CONFIG.yaml [--key value ...]``."""

from __future__ import annotations

import argparse
import os

__all__ = ["register_train"]


def _run(args: argparse.Namespace) -> int:
    from lmstack.train._config import load_train_config
    from lmstack.train.recipes import (
        LoRAConfig,
        PretrainConfig,
        SFTConfig,
        lora,
        pretrain,
        qlora,
        sft,
    )

    if args.recipe == "pretrain":
        result = pretrain(load_train_config(PretrainConfig, args.config, args.overrides))
    elif args.recipe == "lora":
        result = lora(load_train_config(LoRAConfig, args.config, args.overrides))
    elif args.recipe == "qlora":
        result = qlora(load_train_config(LoRAConfig, args.config, args.overrides))
    else:
        result = sft(load_train_config(SFTConfig, args.config, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary rather than one per rank
        print(result.summary(), flush=True)
    return 0


def register_train(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack train``."""
    p = subparsers.add_parser(
        "train",
        help="pretrain or finetune a model",
        description="Run a training recipe from a YAML config; override any key as --section.key value.",
    )
    p.add_argument(
        "recipe",
        choices=["pretrain", "sft", "lora", "qlora"],
        help="which recipe (lora/qlora write final/adapter in PEFT format; final/merged with merge: true)",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional: overrides alone work too)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs, e.g. --run.max_steps 10")
    p.set_defaults(func=_run)
