"""lmstack.train: Pretraining, finetuning (full, LoRA, QLoRA) and alignment.

* Recipes (:mod:`lmstack.train.recipes`): ``pretrain`` (training the tokenizer when asked), ``sft``,
  ``lora`` and ``qlora`` (adapters in PEFT's format, merged on request); ``lmstack train
  pretrain|sft|lora|qlora CONFIG.yaml [--key value ...]``.
* The loop (:func:`train_loop`, :class:`OptimConfig`, :class:`RunConfig`, :class:`TrainResult`):
  AdamW with warmup and cosine/linear decay, gradient accumulation, clipping, bf16 autocast,
  activation checkpointing, NaN/inf stop, atomic checkpoints with exact O(1) resume, DDP or FSDP2
  under torchrun, metrics.jsonl and TensorBoard.
* The data pipeline: streamed jsonl/json/parquet/text readers; Alpaca, ShareGPT, OpenAI-messages and
  plain-text formats; tokenization through the model's chat template with loss on assistant turns;
  a pre-tokenization cache; best-fit packing with per-sample positions; a resumable, rank-aware
  loader; typed YAML configs with command-line overrides.
"""

from lmstack.train._config import DataConfig, config_to_dict, load_config, save_config
from lmstack.train._errors import DataError, TrainConfigError, TrainError
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, token_loss, train_loop
from lmstack.train.data import (
    IGNORE_INDEX,
    ChatTemplateError,
    DataPosition,
    DataStats,
    PackedBatch,
    PackedDataset,
    PaddedBatch,
    PaddedDataset,
    ResumableLoader,
    Sample,
    SampleTokenizer,
    TokenizedDataset,
    build_dataset,
    tokenize_dataset,
)

__version__ = "0.1.0"

__all__: list[str] = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "DataConfig",
    "DataError",
    "DataPosition",
    "DataStats",
    "OptimConfig",
    "PackedBatch",
    "PackedDataset",
    "PaddedBatch",
    "PaddedDataset",
    "ResumableLoader",
    "RunConfig",
    "Sample",
    "SampleTokenizer",
    "TokenizedDataset",
    "TrainConfigError",
    "TrainError",
    "TrainResult",
    "build_dataset",
    "config_to_dict",
    "load_config",
    "save_config",
    "token_loss",
    "tokenize_dataset",
    "train_loop",
]
