"""The training data pipeline: files -> samples -> tokens (cached) -> packed bins -> batches.

* :func:`resolve_data_files` / :func:`read_records`: streaming readers for ``.jsonl``, ``.json``,
  ``.parquet`` and ``.txt`` files.
* :func:`iter_samples` / :func:`to_sample` / :func:`detect_format`: Alpaca, ShareGPT, OpenAI messages
  and plain text, as :class:`Sample` conversations or documents.
* :class:`SampleTokenizer`: the model's chat template, with the loss on the assistant turns.
* :func:`tokenize_dataset` / :class:`TokenizedDataset`: the pre-tokenization cache.
* :class:`PackedDataset` (best-fit packing; :class:`PackedBatch` for
  :class:`lmstack.core.PackedAttention`) and :class:`PaddedDataset` (:class:`PaddedBatch`).
* :class:`ResumableLoader`: deterministic batches with an exact, O(1) resumable :class:`DataPosition`.
* :func:`build_dataset`: all of the above from a :class:`~lmstack.train.DataConfig`.

Labels are unshifted everywhere (``labels[t]`` is the target of the logits at ``t - 1``) and -100
(:data:`IGNORE_INDEX`) where no loss is taken, including the first token of every sample.
"""

from lmstack.train.data._cache import CACHE_VERSION, TokenizedDataset, cache_key, tokenize_dataset
from lmstack.train.data._formats import (
    CHAT_ROLES,
    SHAREGPT_ROLES,
    EmptyTurnError,
    FormatName,
    Sample,
    detect_format,
    iter_samples,
    to_sample,
)
from lmstack.train.data._loader import DataPosition, ResumableLoader, build_dataset
from lmstack.train.data._packing import (
    PackedBatch,
    PackedBin,
    PackedDataset,
    PaddedBatch,
    PaddedDataset,
    best_fit_bins,
    collate_packed,
    collate_padded,
)
from lmstack.train.data._readers import SUPPORTED_SUFFIXES, RawRecord, read_records, resolve_data_files
from lmstack.train.data._stats import DataStats
from lmstack.train.data._tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    RenderedSample,
    SampleTokenizer,
    TokenizedSample,
)

__all__ = [
    "CACHE_VERSION",
    "CHAT_ROLES",
    "IGNORE_INDEX",
    "SHAREGPT_ROLES",
    "SUPPORTED_SUFFIXES",
    "ChatTemplateError",
    "DataPosition",
    "DataStats",
    "EmptyTurnError",
    "FormatName",
    "PackedBatch",
    "PackedBin",
    "PackedDataset",
    "PaddedBatch",
    "PaddedDataset",
    "RawRecord",
    "RenderedSample",
    "ResumableLoader",
    "Sample",
    "SampleTokenizer",
    "TokenizedDataset",
    "TokenizedSample",
    "best_fit_bins",
    "build_dataset",
    "cache_key",
    "collate_packed",
    "collate_padded",
    "detect_format",
    "iter_samples",
    "read_records",
    "resolve_data_files",
    "to_sample",
    "tokenize_dataset",
]
