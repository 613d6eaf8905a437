"""Training recipes: each one a plain, readable script over the shared loop and data pipeline."""

from lmstack.train.recipes.pretrain import ArchConfig, PretrainConfig, TokenizerConfig, pretrain
from lmstack.train.recipes.sft import SFTConfig, sft

__all__ = ["ArchConfig", "PretrainConfig", "SFTConfig", "TokenizerConfig", "pretrain", "sft"]
