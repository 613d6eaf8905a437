"""Pretrain a model from scratch: (train a tokenizer,) initialise, and train on plain text.

Run it as ``lmstack train pretrain CONFIG.yaml [--key value ...]`` or call :func:`pretrain`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer, train_bpe_tokenizer
from lmstack.train._dist import barrier, init_distributed
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train.data import iter_samples, resolve_data_files
from lmstack.train.data._config import DataConfig

__all__ = ["ArchConfig", "PretrainConfig", "TokenizerConfig", "pretrain"]

logger = logging.getLogger(__name__)


@dataclass
class ArchConfig:
    """The architecture of the model to create (a Llama-family decoder; InternLM-style by default)."""

    model_type: Literal["llama", "internlm3", "qwen2", "mistral"] = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class TokenizerConfig:
    """Use an existing tokenizer (``path``) or train a byte-level BPE one on the training data."""

    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(format="text", train_on="all"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _tokenizer(cfg: PretrainConfig) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer.from_pretrained(cfg.tokenizer.path)
    saved = Path(cfg.run.output_dir) / "tokenizer"
    info = init_distributed(cfg.run.device)
    if not info.is_main:  # rank 0 trains the tokenizer; the others load what it wrote
        barrier()
        return Tokenizer.from_pretrained(saved)
    if (saved / "tokenizer.json").is_file():  # a resumed run keeps the tokenizer it started with
        barrier()
        return Tokenizer.from_pretrained(saved)
    files = resolve_data_files(cfg.data.paths)
    texts = (s.text if s.text is not None else " ".join(m["content"] or "" for m in s.messages or [])
             for s in iter_samples(files, cfg.data))  # fmt: skip
    logger.info("training a %d-token BPE tokenizer on %d file(s)", cfg.tokenizer.vocab_size, len(files))
    tokenizer = train_bpe_tokenizer(
        texts, cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency
    )
    tokenizer.save_pretrained(saved)
    barrier()
    return tokenizer


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Create a model from ``cfg.arch`` and train it on ``cfg.data``; returns the run's result."""
    tokenizer = _tokenizer(cfg)
    a = cfg.arch
    # A chat model must stop at its end-of-turn token, not only at the document end.
    eos: list[int] = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    if end_of_turn is not None and "<|im_end|>" in (tokenizer.chat_template or "") and end_of_turn not in eos:
        eos.append(end_of_turn)
    config = ModelConfig(
        model_type=a.model_type,
        vocab_size=tokenizer.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        rope_theta=a.rope_theta,
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.run.seed)
    model = CausalLM(config)
    model.reset_parameters(std=a.init_std)
    logger.info("pretraining a %s model with %d parameters", a.model_type, model.num_parameters())
    return train_loop(
        model, tokenizer, cfg.data, cfg.optim, cfg.run, config_to_save=cfg, parallel=cfg.parallel
    )
