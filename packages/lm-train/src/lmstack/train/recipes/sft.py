"""Supervised finetuning of all weights on chats (loss on assistant turns by default).

Run it as ``lmstack train sft CONFIG.yaml [--key value ...]`` or call :func:`sft`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.core import Tokenizer, load_pretrained
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import TrainConfigError

__all__ = ["SFTConfig", "sft"]


@dataclass
class SFTConfig:
    """Everything a full-finetuning run needs; ``model`` is a Hugging Face directory."""

    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=5, weight_decay=0.0))
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def sft(cfg: SFTConfig) -> TrainResult:
    """Finetune ``cfg.model`` on ``cfg.data``; returns the run's result (the model in ``final/``)."""
    if not cfg.model:
        raise TrainConfigError("sft needs model: the Hugging Face directory to finetune.", field="model")
    model = load_pretrained(cfg.model, dtype="float32")
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    return train_loop(
        model, tokenizer, cfg.data, cfg.optim, cfg.run, config_to_save=cfg, parallel=cfg.parallel
    )
