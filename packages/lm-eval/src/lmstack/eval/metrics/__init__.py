"""Metrics for lmstack-eval: pure functions over per-sample model outputs.

Each sample's model output is a small result object (:class:`ChoiceResult`,
:class:`GenerationResult`, :class:`RollingResult`, :class:`LoglikelihoodResult`,
:class:`CodeResult`). A :class:`Metric` from the registry (:func:`get_metric`) turns each result into
a per-sample item and the items into a :class:`Score` with its standard error::

    from lmstack.eval.metrics import ChoiceResult, get_metric

    metric = get_metric("acc_norm")
    items = [metric.item(ChoiceResult([-4.1, -2.0], [" cat", " elephant"], gold=1))]
    metric.score(items)  # Score(value=1.0, stderr=None, n=1)

The numbers follow lm-evaluation-harness where it defines the metric (acc, exact_match and
its normalisers, perplexities, bits per byte, group stderrs), sacrebleu for corpus BLEU
and rouge-score for ROUGE-L.
"""

from __future__ import annotations

from lmstack.eval.metrics._choice import ChoiceResult
from lmstack.eval.metrics._code import CodeResult, pass_at_k
from lmstack.eval.metrics._errors import MetricError, UnknownMetricError
from lmstack.eval.metrics._likelihood import (
    RollingResult,
)
from lmstack.eval.metrics._math import math_equal
from lmstack.eval.metrics._registry import (
    LoglikelihoodResult,
    Metric,
    get_metric,
    metric_names,
    register_metric,
)
from lmstack.eval.metrics._stats import (
    Score,
    group_score,
)
from lmstack.eval.metrics._text import (
    Extraction,
    GenerationResult,
    exact_match,
    extract_answer,
)

__all__ = [
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
    "exact_match",
    "extract_answer",
    "get_metric",
    "group_score",
    "math_equal",
    "metric_names",
    "pass_at_k",
    "register_metric",
]
