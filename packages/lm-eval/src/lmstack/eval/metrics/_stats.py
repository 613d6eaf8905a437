"""Aggregation statistics: means, standard errors (closed form and bootstrap) and group averages.

The formulas follow lm-evaluation-harness so that the numbers agree with it: the standard error of a
mean is the sample standard deviation (Bessel-corrected) over sqrt(n); non-mean aggregates (BLEU,
perplexity) get a bootstrap estimate, here seeded so that a rerun reports the same value; a group's
micro average weights each member by its sample count (pooled-variance stderr) and its macro average
weights the members equally.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lmstack.eval.metrics._errors import MetricError

__all__ = [
    "Score",
    "bootstrap_stderr",
    "group_score",
    "mean",
    "mean_stderr",
    "sample_stddev",
    "weighted_mean",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Score:
    """An aggregated metric value.

    Attributes:
        value: The aggregate (a mean, a corpus BLEU, a perplexity, ...).
        stderr: Its standard error, or ``None`` when it was not computed (one sample, no bootstrap).
        n: How many samples it aggregates.
    """

    value: float
    stderr: float | None
    n: int


def _require_samples(values: Sequence[Any], what: str) -> None:
    if len(values) == 0:
        raise MetricError(f"cannot compute {what} of zero samples")


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean.

    Args:
        values: At least one number.

    Returns:
        The mean.

    Raises:
        MetricError: ``values`` is empty.
    """
    _require_samples(values, "the mean")
    return math.fsum(values) / len(values)


def sample_stddev(values: Sequence[float]) -> float:
    """Bessel-corrected sample standard deviation (divides by n - 1).

    Args:
        values: At least two numbers.

    Returns:
        The standard deviation.

    Raises:
        MetricError: fewer than two values.
    """
    if len(values) < 2:
        raise MetricError(f"a sample standard deviation needs at least 2 values, got {len(values)}")
    mu = mean(values)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: ``sample_stddev / sqrt(n)`` (lm-evaluation-harness's ``mean_stderr``).

    Args:
        values: At least two numbers.

    Returns:
        The standard error.
    """
    return sample_stddev(values) / math.sqrt(len(values))


def weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """``sum(value) / sum(weight)`` over ``(value, weight)`` pairs.

    Args:
        pairs: At least one pair; the weights must not sum to zero.

    Returns:
        The ratio of sums.

    Raises:
        MetricError: no pairs, or the weights sum to zero.
    """
    _require_samples(pairs, "a weighted mean")
    total_weight = math.fsum(w for _, w in pairs)
    if total_weight == 0:
        raise MetricError("the weights of a weighted mean sum to zero")
    return math.fsum(v for v, _ in pairs) / total_weight


def bootstrap_stderr(
    statistic: Callable[[Sequence[T]], float],
    items: Sequence[T],
    *,
    iters: int = 1000,
    seed: int = 1234,
) -> float:
    """Bootstrap standard error of ``statistic(items)``.

    Draws ``iters`` resamples of ``items`` with replacement (the same size as ``items``) from a
    generator seeded with ``seed``, and returns the sample standard deviation of the statistic over
    them. Seeded, so the same items always give the same estimate.

    Args:
        statistic: A function of a list of items (corpus BLEU, perplexity, ...).
        items: The per-sample items; at least one.
        iters: The number of resamples, at least 2.
        seed: The resampling seed.

    Returns:
        The estimated standard error.

    Raises:
        MetricError: no items or fewer than 2 iterations.
    """
    _require_samples(items, "a bootstrap standard error")
    if iters < 2:
        raise MetricError(f"bootstrap needs at least 2 iterations, got {iters}")
    rng = random.Random(seed)
    replicates = [statistic(rng.choices(items, k=len(items))) for _ in range(iters)]
    return sample_stddev(replicates)


def group_score(scores: Sequence[Score], weighting: Literal["micro", "macro"] = "micro") -> Score:
    """Combine member tasks' scores into a group score.

    ``micro`` weights each member by its sample count (the mean over all the group's samples when the
    members are means); its standard error pools the members' variances (lm-evaluation-harness's
    ``pooled_sample_stderr``). ``macro`` is the plain mean of the members' values; its standard error
    is ``sqrt(sum(se_i ** 2)) / k`` for ``k`` independent member means.

    Args:
        scores: The members' scores, at least one.
        weighting: ``"micro"`` or ``"macro"``.

    Returns:
        The group's score; its ``n`` is the members' total; its stderr is ``None`` when a member's is.

    Raises:
        MetricError: no members, an unknown weighting, or members without samples.
    """
    _require_samples(scores, "a group score")
    sizes = [s.n for s in scores]
    if min(sizes) <= 0:
        raise MetricError("every member of a group needs at least one sample")
    total = sum(sizes)
    have_stderr = all(s.stderr is not None for s in scores)
    stderrs = [s.stderr or 0.0 for s in scores]
    stderr: float | None
    if weighting == "micro":
        value = math.fsum(s.value * s.n for s in scores) / total
        stderr = None
        if have_stderr and total > len(scores):
            # Each member's variance recovered from its stderr, pooled by degrees of freedom.
            pooled_var = math.fsum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs, strict=True)) / (
                total - len(scores)
            )
            stderr = math.sqrt(pooled_var / total)
    elif weighting == "macro":
        value = math.fsum(s.value for s in scores) / len(scores)
        stderr = math.sqrt(math.fsum(se**2 for se in stderrs)) / len(scores) if have_stderr else None
    else:
        raise MetricError(f"unknown group weighting {weighting!r}; use 'micro' or 'macro'")
    return Score(value=value, stderr=stderr, n=total)
