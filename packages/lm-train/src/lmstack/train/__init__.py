"""lmstack.train: Pretraining, finetuning (full, LoRA, QLoRA) and alignment.

Landed so far: the data pipeline (streamed jsonl/json/parquet/text readers; Alpaca, ShareGPT,
OpenAI-messages and plain-text formats; tokenization through the model's chat template with loss on
assistant turns; a pre-tokenization cache; best-fit packing with per-sample positions; a resumable,
rank-aware loader) and typed YAML configs with command-line overrides.
"""

from lmstack.train._config import DataConfig, config_to_dict, load_config, save_config
from lmstack.train._errors import DataError, TrainConfigError, TrainError
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
    "PackedBatch",
    "PackedDataset",
    "PaddedBatch",
    "PaddedDataset",
    "ResumableLoader",
    "Sample",
    "SampleTokenizer",
    "TokenizedDataset",
    "TrainConfigError",
    "TrainError",
    "build_dataset",
    "config_to_dict",
    "load_config",
    "save_config",
    "tokenize_dataset",
]
