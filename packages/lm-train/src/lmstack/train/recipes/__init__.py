"""Training recipes: each one a plain, readable script over the shared loop and data pipeline."""

from lmstack.train.recipes.lora import (
    LoRAConfig,
    LoRASettings,
    apply_lora,
    lora,
    merge_lora,
    qlora,
    save_adapter,
)
from lmstack.train.recipes.pretrain import ArchConfig, PretrainConfig, TokenizerConfig, pretrain
from lmstack.train.recipes.sft import SFTConfig, sft

__all__ = [
    "ArchConfig",
    "LoRAConfig",
    "LoRASettings",
    "PretrainConfig",
    "SFTConfig",
    "TokenizerConfig",
    "apply_lora",
    "lora",
    "merge_lora",
    "pretrain",
    "qlora",
    "save_adapter",
    "sft",
]
