"""Exact match with lm-evaluation-harness's normalisers, and answer extraction from free text.

Normalisation applies, in lm-evaluation-harness's order: each of ``regexes_to_ignore`` removed (to
both the prediction and the reference), then lower-casing, then ASCII punctuation removed, then
digits removed.

Extraction pulls the answer out of a model's reply by one or more strategies tried in order, and
says whether any of them found one (:class:`Extraction`), so a log can tell a wrong answer from an
answer that could not be read.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from lmstack.eval.metrics._errors import MetricError

__all__ = [
    "EXTRACTION_STRATEGIES",
    "Extraction",
    "GenerationResult",
    "contains",
    "exact_match",
    "extract_answer",
    "normalize_text",
]

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DROP_DIGITS = str.maketrans("", "", string.digits)


@dataclass(frozen=True)
class GenerationResult:
    """One generated reply and its reference answers.

    Attributes:
        prediction: The model's reply (after any extraction).
        references: One or more acceptable answers; a sample scores its best match among them.
    """

    prediction: str
    references: Sequence[str]

    def __post_init__(self) -> None:
        if isinstance(self.references, str):
            raise MetricError("references must be a sequence of strings, not a single string")
        if len(self.references) == 0:
            raise MetricError("a generation result needs at least one reference")


def normalize_text(
    text: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> str:
    """Normalise a string as lm-evaluation-harness's ``exact_match`` does before comparing.

    Args:
        text: The string.
        ignore_case: Lower-case it.
        ignore_punctuation: Remove ASCII punctuation (``string.punctuation``).
        ignore_numbers: Remove the digits 0-9.
        regexes_to_ignore: Patterns whose matches are removed, in order, before anything else.

    Returns:
        The normalised string.
    """
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_DROP_PUNCTUATION)
    if ignore_numbers:
        text = text.translate(_DROP_DIGITS)
    return text


def exact_match(
    result: GenerationResult,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0.

    Args:
        result: The prediction and its references.
        ignore_case: See :func:`normalize_text`.
        ignore_punctuation: See :func:`normalize_text`.
        ignore_numbers: See :func:`normalize_text`.
        regexes_to_ignore: See :func:`normalize_text`.

    Returns:
        The per-sample exact match.
    """
    if isinstance(regexes_to_ignore, str):
        regexes_to_ignore = [regexes_to_ignore]

    def norm(text: str) -> str:
        return normalize_text(
            text,
            ignore_case=ignore_case,
            ignore_punctuation=ignore_punctuation,
            ignore_numbers=ignore_numbers,
            regexes_to_ignore=regexes_to_ignore,
        )

    prediction = norm(result.prediction)
    return 1.0 if any(prediction == norm(r) for r in result.references) else 0.0


@dataclass(frozen=True)
class Extraction:
    """The outcome of :func:`extract_answer`.

    Attributes:
        answer: The extracted answer, or the fallback when nothing was found.
        ok: Whether a strategy found an answer (``False`` means ``answer`` is the fallback).
        strategy: The strategy that found it, or ``None``.
    """

    answer: str
    ok: bool
    strategy: str | None


# A number as people write it: sign, thousands separators, decimals or a simple fraction.
# A minus sign counts only where it cannot be a hyphen or a subtraction ("2024-03", "5-3").
_SIGN = r"(?:(?<![\w.])-)?"
_NUMBER = rf"{_SIGN}\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|{_SIGN}\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_number(text: str) -> str | None:
    matches = [m.group(0) for m in _NUMBER_RE.finditer(text)]
    if not matches:
        return None
    # Thousands separators and a currency sign are formatting, not part of the number.
    return matches[-1].replace(",", "").replace("$", "").rstrip(".")


def _choice_letter(text: str, letters: str) -> str | None:
    cls = f"[{re.escape(letters)}]"
    patterns = (
        rf"\(({cls})\)",  # "(B)"
        rf"(?i:answer)\s*(?:(?i:is))?\s*:?\s*\(?({cls})\b",  # "answer: B", "the answer is B"
        rf"(?:^|\s)({cls})[.):](?:\s|$)",  # "B." "B)" "B:" standing alone
        rf"(?<![\w'])({cls})(?![\w'])",  # a lone letter
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def _answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    # The last statement wins: models often restate or correct themselves.
    answer = text[matches[-1].end() :].split("\n", 1)[0]
    answer = re.split(r"(?<=[^\d])\.(?:\s|$)|\.\s", answer, maxsplit=1)[0]
    answer = answer.strip().strip("*").strip()
    boxed = _boxed(answer)
    if boxed is not None:
        return boxed
    return answer.rstrip(".").strip() or None


def _boxed(text: str) -> str | None:
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def _regex(text: str, pattern: str, group: int | str, select: int) -> str | None:
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    try:
        match = matches[select]
    except IndexError:
        return None
    try:
        found = match.group(group)
    except IndexError as exc:
        raise MetricError(f"regex {pattern!r} has no group {group!r}") from exc
    if found is None and group == 1 and match.re.groups > 1:
        # lm-evaluation-harness's alternatives pattern: take the first group that matched.
        found = next((g for g in match.groups() if g), None)
    return found.strip() if found else None


EXTRACTION_STRATEGIES = ("regex", "last_number", "choice_letter", "answer_is", "boxed")
"""The strategy names :func:`extract_answer` accepts."""


def extract_answer(
    text: str,
    strategies: Sequence[str] = ("answer_is", "boxed", "last_number"),
    *,
    pattern: str | None = None,
    group: int | str = 1,
    select: int = 0,
    letters: str = "ABCD",
    fallback: str = "[invalid]",
) -> Extraction:
    r"""Pull an answer out of a free-text reply, trying ``strategies`` in order.

    Strategies:

    - ``regex``: ``pattern``'s ``group`` in its ``select``-th match (``-1``: the last match); a
      pattern of alternatives whose group 1 did not take part gives its first group that did.
    - ``last_number``: the last number in the text, thousands separators and ``$`` removed
      (``"1,234"``, ``"-3.5"``, ``"2/3"``).
    - ``choice_letter``: the first choice letter among ``letters``, preferring explicit forms
      (``"(B)"``, ``"answer: B"``, ``"B."``) over a lone letter.
    - ``answer_is``: what follows the last "the answer is" up to the end of its sentence or line
      (a ``\boxed{...}`` in it is unwrapped).
    - ``boxed``: the content of the last ``\boxed{...}`` (nested braces kept).

    Args:
        text: The model's reply.
        strategies: Strategy names, tried in order until one finds an answer.
        pattern: The regular expression for ``regex``.
        group: The group of ``pattern`` to return (number or name).
        select: Which match of ``pattern`` to use.
        letters: The choice letters for ``choice_letter``.
        fallback: The answer returned when no strategy finds one.

    Returns:
        The answer, whether it was found, and by which strategy.

    Raises:
        MetricError: an unknown strategy, or ``regex`` without a pattern.
    """
    if isinstance(strategies, str):
        strategies = [strategies]
    for name in strategies:
        if name not in EXTRACTION_STRATEGIES:
            raise MetricError(
                f"unknown extraction strategy {name!r}; known: {', '.join(EXTRACTION_STRATEGIES)}"
            )
        if name == "regex" and pattern is None:
            raise MetricError("the 'regex' extraction strategy needs a pattern")
    for name in strategies:
        found: str | None
        if name == "regex":
            assert pattern is not None
            found = _regex(text, pattern, group, select)
        elif name == "last_number":
            found = _last_number(text)
        elif name == "choice_letter":
            found = _choice_letter(text, letters)
        elif name == "answer_is":
            found = _answer_is(text)
        else:
            found = _boxed(text)
        if found:
            return Extraction(answer=found, ok=True, strategy=name)
    return Extraction(answer=fallback, ok=False, strategy=None)


def contains(result: GenerationResult, *, ignore_case: bool = False) -> float:
    """1.0 when a reference occurs in the prediction as whole words, else 0.0.

    For free-form replies that state the answer in a sentence (the world's questions, the needle in a
    haystack), where exact match would demand the bare value: ``red`` is not found in ``Fredor``.

    Args:
        result: The reply and its acceptable answers.
        ignore_case: Compare case-insensitively.

    Returns:
        The per-sample score.
    """
    flags = re.IGNORECASE if ignore_case else 0
    for reference in result.references:
        if re.search(rf"(?<!\w){re.escape(reference)}(?!\w)", result.prediction, flags):
            return 1.0
    return 0.0
