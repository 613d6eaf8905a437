"""The training data pipeline: files -> samples -> tokens (cached) -> packed bins -> batches.

* :class:`DataConfig`: where the data is and how it becomes batches (the ``data:`` section of a
  recipe's config).
* :func:`resolve_data_files` / :func:`iter_samples`: streaming readers for ``.jsonl``, ``.json``,
  ``.parquet`` and ``.txt`` files, in the Alpaca, ShareGPT, OpenAI-messages and plain-text formats,
  as :class:`Sample` conversations or documents.
* :class:`SampleTokenizer`: the model's chat template, with the loss on the assistant turns.
* :func:`tokenize_dataset` / :class:`TokenizedDataset`: the pre-tokenization cache.
* :class:`PackedDataset` (best-fit packing; :class:`PackedBatch` for
  :class:`lmstack.core.PackedAttention`) and :class:`PaddedDataset` (:class:`PaddedBatch`).
* :class:`ResumableLoader`: deterministic batches with an exact, O(1) resumable :class:`DataPosition`.
* :func:`build_dataset`: all of the above from a :class:`DataConfig`; :class:`DataStats` counts
  what it read, skipped and padded.

Preference data (issue 16, in progress): :func:`iter_preference_samples` reads TRL-style,
OpenAI-messages-with-two-endings, UltraFeedback-style and KTO rows; :class:`PreferenceTokenizer` /
:func:`tokenize_preferences` put the loss on the completion only; :func:`build_preference_dataset`
packs each pair's chosen and rejected into the same bin (:class:`PreferenceBatch`), or pads them.

Labels are unshifted everywhere (``labels[t]`` is the target of the logits at ``t - 1``) and -100
(:data:`IGNORE_INDEX`) where no loss is taken, including the first token of every sample.
"""

from lmstack.train.data._cache import TokenizedDataset, tokenize_dataset
from lmstack.train.data._config import DataConfig
from lmstack.train.data._formats import Sample, iter_samples
from lmstack.train.data._loader import DataPosition, ResumableLoader, build_dataset
from lmstack.train.data._packing import PackedBatch, PackedDataset, PaddedBatch, PaddedDataset
from lmstack.train.data._preference import (
    PreferenceSample,
    PreferenceTokenizer,
    iter_preference_samples,
    tokenize_preferences,
)
from lmstack.train.data._preference_packing import (
    KTOBatch,
    PreferenceBatch,
    build_preference_dataset,
)
from lmstack.train.data._readers import resolve_data_files
from lmstack.train.data._stats import DataStats
from lmstack.train.data._tokenize import IGNORE_INDEX, ChatTemplateError, SampleTokenizer

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "DataConfig",
    "DataPosition",
    "DataStats",
    "KTOBatch",
    "PackedBatch",
    "PackedDataset",
    "PaddedBatch",
    "PaddedDataset",
    "PreferenceBatch",
    "PreferenceSample",
    "PreferenceTokenizer",
    "ResumableLoader",
    "Sample",
    "SampleTokenizer",
    "TokenizedDataset",
    "build_dataset",
    "build_preference_dataset",
    "iter_preference_samples",
    "iter_samples",
    "resolve_data_files",
    "tokenize_dataset",
    "tokenize_preferences",
]
