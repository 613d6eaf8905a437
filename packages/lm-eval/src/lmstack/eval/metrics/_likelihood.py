r"""Perplexities and bits per byte from log-likelihoods, as lm-evaluation-harness aggregates them.

A rolling log-likelihood document contributes ``(loglikelihood, count)`` pairs, and the aggregate is a
ratio of sums over the whole corpus (not a mean of per-document ratios), so long documents weigh
more: ``word_perplexity = exp(-sum(ll) / sum(words))``, ``byte_perplexity = exp(-sum(ll) /
sum(bytes))``, ``bits_per_byte = -sum(ll) / sum(bytes) / ln 2`` and ``token_perplexity = exp(-sum(ll) /
sum(tokens))``. Words are the pieces of ``re.split(r"\s+", text)`` and bytes are UTF-8 bytes, as
lm-evaluation-harness counts them. ``perplexity`` is lm-evaluation-harness's metric for a
``loglikelihood`` task: ``exp(-mean(ll))`` over the per-sample continuation log-likelihoods.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lmstack.eval.metrics._errors import MetricError
from lmstack.eval.metrics._stats import mean, weighted_mean

__all__ = [
    "RollingResult",
    "bits_per_byte",
    "count_bytes",
    "count_words",
    "perplexity",
    "weighted_perplexity",
]


@dataclass(frozen=True)
class RollingResult:
    """One document's rolling log-likelihood.

    Attributes:
        loglikelihood: The sum of the log-probabilities of all of the document's tokens (natural log).
        text: The document, whose words and bytes are counted.
        num_tokens: How many tokens the log-likelihood covers (for ``token_perplexity``), if known.
    """

    loglikelihood: float
    text: str
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.loglikelihood > 0 or math.isnan(self.loglikelihood):
            raise MetricError(f"a log-likelihood must be <= 0, got {self.loglikelihood}")


def count_words(text: str) -> int:
    r"""Words as lm-evaluation-harness counts them: the pieces of ``re.split(r"\s+", text)``.

    Args:
        text: The document.

    Returns:
        The count (leading or trailing whitespace adds an empty piece, as there).
    """
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """The document's length in UTF-8 bytes.

    Args:
        text: The document.

    Returns:
        The byte count.
    """
    return len(text.encode("utf-8"))


def weighted_perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    """``exp(-sum(ll) / sum(count))`` over ``(loglikelihood, count)`` pairs.

    Args:
        pairs: One pair per document.

    Returns:
        The corpus perplexity per counted unit.
    """
    return math.exp(-weighted_mean(pairs))


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    """``-sum(ll) / sum(bytes) / ln 2`` over ``(loglikelihood, bytes)`` pairs.

    Args:
        pairs: One pair per document.

    Returns:
        The corpus's bits per byte.
    """
    return -weighted_mean(pairs) / math.log(2)


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """``exp(-mean(ll))`` over per-sample log-likelihoods (lm-evaluation-harness's ``perplexity``).

    Args:
        loglikelihoods: One log-likelihood per sample.

    Returns:
        The perplexity.
    """
    return math.exp(-mean(loglikelihoods))
