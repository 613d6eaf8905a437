"""Multiple choice scored by log-likelihood: ``acc``, ``acc_norm`` and ``acc_bytes``.

As lm-evaluation-harness scores a ``multiple_choice`` task: the prediction is the choice with the
highest log-likelihood (``acc``), that log-likelihood divided by the choice's length in characters
(``acc_norm``) or in UTF-8 bytes (``acc_bytes``). Ties go to the first choice, like ``numpy.argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmstack.eval.metrics._errors import MetricError

__all__ = ["ChoiceResult", "acc", "acc_bytes", "acc_norm", "first_argmax"]


@dataclass(frozen=True)
class ChoiceResult:
    """One multiple-choice document's model output.

    Attributes:
        loglikelihoods: The log-likelihood of each choice's continuation given the context.
        choices: The choices' texts, in the same order (their lengths normalise ``acc_norm``).
        gold: The index of the right choice, or several indices when more than one is right.
    """

    loglikelihoods: Sequence[float]
    choices: Sequence[str]
    gold: int | Sequence[int]

    def __post_init__(self) -> None:
        if len(self.choices) == 0:
            raise MetricError("a multiple-choice result needs at least one choice")
        if len(self.loglikelihoods) != len(self.choices):
            raise MetricError(
                f"{len(self.loglikelihoods)} log-likelihoods for {len(self.choices)} choices; "
                "give one log-likelihood per choice"
            )
        for index in self.gold_indices:
            if not 0 <= index < len(self.choices):
                raise MetricError(f"gold index {index} is out of range for {len(self.choices)} choices")

    @property
    def gold_indices(self) -> tuple[int, ...]:
        """The right choices' indices as a tuple."""
        return (self.gold,) if isinstance(self.gold, int) else tuple(self.gold)


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (as ``numpy.argmax``).

    Args:
        values: At least one number.

    Returns:
        The index.
    """
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _correct(result: ChoiceResult, scores: Sequence[float]) -> float:
    return 1.0 if first_argmax(scores) in result.gold_indices else 0.0


def _normalised(result: ChoiceResult, lengths: Sequence[int]) -> list[float]:
    if min(lengths) == 0:
        raise MetricError("a choice is empty: length normalisation divides by its length")
    return [ll / n for ll, n in zip(result.loglikelihoods, lengths, strict=True)]


def acc(result: ChoiceResult) -> float:
    """1.0 when the most likely choice is a gold one, else 0.0.

    Args:
        result: The document's choices and log-likelihoods.

    Returns:
        The per-sample accuracy.
    """
    return _correct(result, result.loglikelihoods)


def acc_norm(result: ChoiceResult) -> float:
    """Accuracy with each log-likelihood divided by its choice's length in characters.

    Args:
        result: The document's choices and log-likelihoods.

    Returns:
        The per-sample length-normalised accuracy.
    """
    return _correct(result, _normalised(result, [len(c) for c in result.choices]))


def acc_bytes(result: ChoiceResult) -> float:
    """Accuracy with each log-likelihood divided by its choice's length in UTF-8 bytes.

    Args:
        result: The document's choices and log-likelihoods.

    Returns:
        The per-sample byte-normalised accuracy.
    """
    return _correct(result, _normalised(result, [len(c.encode("utf-8")) for c in result.choices]))
