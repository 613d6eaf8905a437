"""The metric registry: a name -> per-sample function, aggregation, direction.

Task definitions name their metrics by string (``acc``, ``exact_match``, ``bleu``, ``pass@10``...);
:func:`get_metric` resolves the name, and :meth:`Metric.score` turns the per-sample items into a
:class:`Score` with its standard error (closed form for means, a seeded bootstrap otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmstack.eval.metrics import _likelihood as lk
from lmstack.eval.metrics._choice import ChoiceResult, acc, acc_bytes, acc_norm
from lmstack.eval.metrics._code import CodeResult, pass_at_k
from lmstack.eval.metrics._errors import MetricError, UnknownMetricError
from lmstack.eval.metrics._likelihood import RollingResult
from lmstack.eval.metrics._math import math_equiv
from lmstack.eval.metrics._overlap import bleu_corpus, bleu_stats, rouge_l
from lmstack.eval.metrics._stats import Score, bootstrap_stderr, mean, mean_stderr
from lmstack.eval.metrics._text import GenerationResult, contains, exact_match

__all__ = [
    "LoglikelihoodResult",
    "Metric",
    "get_metric",
    "metric_names",
    "register_metric",
]


@dataclass(frozen=True)
class LoglikelihoodResult:
    """One ``loglikelihood`` request's output: a continuation's log-likelihood given its context.

    Attributes:
        loglikelihood: The continuation's log-likelihood (natural log).
        is_greedy: Whether greedy decoding would have produced exactly the continuation.
    """

    loglikelihood: float
    is_greedy: bool


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: The name tasks use.
        result_types: The per-sample result classes it scores (``ChoiceResult``, ...).
        sample: ``sample(result, **options) -> item``: one sample's item (a score, or what the
            aggregation needs, such as BLEU statistics).
        aggregate: Items -> the corpus value.
        higher_is_better: The direction of improvement.
        options: The keyword options ``sample`` accepts (for ``exact_match``: ``ignore_case``...).
        bootstrap: Whether the standard error is bootstrapped (non-mean aggregates); otherwise it is
            the standard error of the mean.
    """

    name: str
    result_types: tuple[type, ...]
    sample: Callable[..., Any]
    aggregate: Callable[[Sequence[Any]], float]
    higher_is_better: bool
    options: tuple[str, ...] = ()
    bootstrap: bool = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Reject options this metric does not take.

        Args:
            options: The options a task gives it.

        Raises:
            MetricError: an option is unknown, naming it and the known ones.
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            named = ", ".join(map(repr, unknown))
            raise MetricError(f"metric {self.name!r} has no option {named}; it takes: {known}")

    def item(self, result: Any, **options: Any) -> Any:
        """Score one sample.

        Args:
            result: The sample's model output, one of :attr:`result_types`.
            **options: Metric options (see :attr:`options`).

        Returns:
            The per-sample item.

        Raises:
            MetricError: wrong result type or unknown option.
        """
        if not isinstance(result, self.result_types):
            expected = " or ".join(t.__name__ for t in self.result_types)
            raise MetricError(f"metric {self.name!r} scores a {expected}, got {type(result).__name__}")
        self.check_options(options)
        return self.sample(result, **options)

    def score(self, items: Sequence[Any], *, bootstrap_iters: int = 1000, seed: int = 1234) -> Score:
        """Aggregate per-sample items into a value with its standard error.

        Args:
            items: The items :meth:`item` returned, one per sample.
            bootstrap_iters: Resamples for a bootstrapped standard error; 0 skips it.
            seed: The bootstrap's seed.

        Returns:
            The score; ``stderr`` is ``None`` for a single sample or when the bootstrap is skipped.
        """
        if len(items) == 0:
            raise MetricError(f"metric {self.name!r}: no samples to aggregate")
        value = float(self.aggregate(items))
        stderr: float | None = None
        if len(items) >= 2:
            if not self.bootstrap:
                stderr = mean_stderr(items)
            elif bootstrap_iters > 0:
                stderr = bootstrap_stderr(self.aggregate, items, iters=bootstrap_iters, seed=seed)
        return Score(value=value, stderr=stderr, n=len(items))


_EXACT_MATCH_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")


def _acc(result: ChoiceResult | LoglikelihoodResult) -> float:
    if isinstance(result, LoglikelihoodResult):
        return float(result.is_greedy)
    return acc(result)


def _rolling(count: Callable[[RollingResult], int]) -> Callable[[RollingResult], tuple[float, int]]:
    def sample(result: RollingResult) -> tuple[float, int]:
        return (result.loglikelihood, count(result))

    return sample


def _token_count(result: RollingResult) -> int:
    if result.num_tokens is None:
        raise MetricError("token_perplexity needs each RollingResult's num_tokens")
    return result.num_tokens


_tokens = _rolling(_token_count)


_words = _rolling(lambda r: lk.count_words(r.text))
_bytes = _rolling(lambda r: lk.count_bytes(r.text))


def _loglikelihood(result: LoglikelihoodResult) -> float:
    return result.loglikelihood


_REGISTRY: dict[str, Metric] = {}
_PASS_AT_K = re.compile(r"pass@([1-9]\d*)")


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Add a metric to the registry.

    Args:
        metric: The metric.
        replace: Allow replacing a metric of the same name.

    Returns:
        The metric, so that registration can be an expression.

    Raises:
        MetricError: the name is taken (and ``replace`` is false) or reserved (``pass@<k>``).
    """
    if _PASS_AT_K.fullmatch(metric.name):
        raise MetricError(f"metric names of the form pass@<k> are reserved, got {metric.name!r}")
    if metric.name in _REGISTRY and not replace:
        raise MetricError(f"metric {metric.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[metric.name] = metric
    return metric


def metric_names() -> list[str]:
    """The registered metric names, sorted (``pass@<k>`` is resolved on demand)."""
    return sorted(_REGISTRY)


def get_metric(name: str) -> Metric:
    """Look a metric up by name.

    Args:
        name: A registered name, or ``pass@<k>`` for any positive ``k``.

    Returns:
        The metric.

    Raises:
        UnknownMetricError: the name is not registered; the message lists the known names.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _PASS_AT_K.fullmatch(name)
    if match:
        k = int(match.group(1))
        return Metric(
            name=name,
            result_types=(CodeResult,),
            sample=lambda result: pass_at_k(result.num_samples, result.num_correct, k),
            aggregate=mean,
            higher_is_better=True,
        )
    raise UnknownMetricError(name, metric_names())


for _metric in (
    Metric("acc", (ChoiceResult, LoglikelihoodResult), _acc, mean, True),
    Metric("acc_norm", (ChoiceResult,), acc_norm, mean, True),
    Metric("acc_bytes", (ChoiceResult,), acc_bytes, mean, True),
    Metric("exact_match", (GenerationResult,), exact_match, mean, True, _EXACT_MATCH_OPTIONS),
    Metric("contains", (GenerationResult,), contains, mean, True, ("ignore_case",)),
    Metric("math_equiv", (GenerationResult,), math_equiv, mean, True, ("rel_tol",)),
    Metric("bleu", (GenerationResult,), bleu_stats, bleu_corpus, True, bootstrap=True),
    Metric("rouge_l", (GenerationResult,), rouge_l, mean, True),
    Metric("perplexity", (LoglikelihoodResult,), _loglikelihood, lk.perplexity, False, bootstrap=True),
    Metric("word_perplexity", (RollingResult,), _words, lk.weighted_perplexity, False, bootstrap=True),
    Metric("byte_perplexity", (RollingResult,), _bytes, lk.weighted_perplexity, False, bootstrap=True),
    Metric("bits_per_byte", (RollingResult,), _bytes, lk.bits_per_byte, False, bootstrap=True),
    Metric("token_perplexity", (RollingResult,), _tokens, lk.weighted_perplexity, False, bootstrap=True),
):
    register_metric(_metric)
