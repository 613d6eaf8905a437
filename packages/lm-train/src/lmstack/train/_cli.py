"""``lmstack train pretrain|sft|lora|qlora|dpo|orpo|simpo|kto|rm CONFIG.yaml [--key value ...]``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

__all__ = ["register_train"]


RECIPES = ("pretrain", "sft", "lora", "qlora", "dpo", "orpo", "simpo", "kto", "rm")


def _run(args: argparse.Namespace) -> int:
    from lmstack.train import recipes as r
    from lmstack.train._config import load_train_config

    configs: dict[str, tuple[type, Callable[[Any], Any]]] = {
        "pretrain": (r.PretrainConfig, r.pretrain),
        "sft": (r.SFTConfig, r.sft),
        "lora": (r.LoRAConfig, r.lora),
        "qlora": (r.LoRAConfig, r.qlora),
        "dpo": (r.DPOConfig, r.dpo),
        "orpo": (r.ORPOConfig, r.orpo),
        "simpo": (r.SimPOConfig, r.simpo),
        "kto": (r.KTOConfig, r.kto),
        "rm": (r.RewardConfig, r.rm),
    }
    config_class, recipe = configs[args.recipe]
    result = recipe(load_train_config(config_class, args.config, args.overrides))
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
        choices=list(RECIPES),
        help="which recipe (lora/qlora write final/adapter in PEFT format, final/merged with merge: true; "
        "dpo/orpo/simpo/kto align on preference data; rm trains a reward model)",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional: overrides alone work too)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs, e.g. --run.max_steps 10")
    p.set_defaults(func=_run)
