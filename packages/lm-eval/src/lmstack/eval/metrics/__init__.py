"""Metrics for lmstack-eval: pure functions over per-sample model outputs.

Each sample's model output is a small result object (:class:`ChoiceResult`,
:class:`GenerationResult`, :class:`RollingResult`, :class:`LoglikelihoodResult`,
:class:`CodeResult`). A :class:`Metric` from the registry (:func:`get_metric`) turns each result into
a per-sample item and the items into a :class:`Score` with its standard error::

    from lmstack.eval.metrics import ChoiceResult, get_metric

    metric = get_metric("acc_norm")
    items = [metric.item(ChoiceResult([-4.1, -2.0], [" cat", " elephant"], gold=1))]
    metric.score(items)  # Score(value=1.0, stderr=None, n=1)

The numbers follow lm-evaluation-harness where it defines the metric (acc, acc_norm, exact_match and
its normalisers, perplexities, bits per byte, mean_stderr, group stderrs), sacrebleu for corpus BLEU
and rouge-score for ROUGE-L.
"""

from __future__ import annotations

from lmstack.eval.metrics._choice import ChoiceResult, acc, acc_bytes, acc_norm, first_argmax
from lmstack.eval.metrics._code import CodeResult, pass_at_k
from lmstack.eval.metrics._errors import MetricError, UnknownMetricError
from lmstack.eval.metrics._likelihood import (
    RollingResult,
    bits_per_byte,
    count_bytes,
    count_words,
    perplexity,
    weighted_perplexity,
)
from lmstack.eval.metrics._math import math_equal, math_equiv, parse_math
from lmstack.eval.metrics._overlap import bleu_corpus, bleu_stats, rouge_l, rouge_l_fmeasure, tokenize_13a
from lmstack.eval.metrics._registry import (
    LoglikelihoodResult,
    Metric,
    get_metric,
    metric_names,
    register_metric,
)
from lmstack.eval.metrics._stats import (
    Score,
    bootstrap_stderr,
    group_score,
    mean,
    mean_stderr,
    sample_stddev,
    weighted_mean,
)
from lmstack.eval.metrics._text import (
    EXTRACTION_STRATEGIES,
    Extraction,
    GenerationResult,
    contains,
    exact_match,
    extract_answer,
    normalize_text,
)

__all__ = [
    "EXTRACTION_STRATEGIES",
    "ChoiceResult",
    "CodeResult",
    "Extraction",
    "GenerationResult",
    "LoglikelihoodResult",
    "Metric",
    "MetricError",
    "RollingResult",
    "Score",
    "UnknownMetricError",
    "acc",
    "acc_bytes",
    "acc_norm",
    "bits_per_byte",
    "bleu_corpus",
    "bleu_stats",
    "bootstrap_stderr",
    "contains",
    "count_bytes",
    "count_words",
    "exact_match",
    "extract_answer",
    "first_argmax",
    "get_metric",
    "group_score",
    "math_equal",
    "math_equiv",
    "mean",
    "mean_stderr",
    "metric_names",
    "normalize_text",
    "parse_math",
    "pass_at_k",
    "perplexity",
    "register_metric",
    "rouge_l",
    "rouge_l_fmeasure",
    "sample_stddev",
    "tokenize_13a",
    "weighted_mean",
    "weighted_perplexity",
]
