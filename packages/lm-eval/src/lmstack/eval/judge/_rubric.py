"""Rubrics for the LLM judge: the prompt templates it is asked with and the patterns its reply is read by.

A rubric is data: a jinja2 template for the user turn, an optional system prompt, and the regular
expressions that find the verdict in the judge's reply. Templates render in a sandboxed environment
with ``StrictUndefined``, so a template naming a value the sample does not have is an error naming it,
never an empty string in the prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2

from lmstack.eval._errors import EvalError
from lmstack.eval.tasks._templates import DocRenderer

__all__ = [
    "DEFAULT_PAIRWISE_TEMPLATE",
    "DEFAULT_POINTWISE_TEMPLATE",
    "DEFAULT_RATING_PATTERNS",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_VERDICT_PATTERNS",
    "JudgeError",
    "PairwiseRubric",
    "PointwiseRubric",
    "Verdict",
]

Verdict = Literal["first", "second", "tie"]
"""A pairwise judgement by slot: the answer shown first is better, the second is, or neither."""

DEFAULT_SYSTEM_PROMPT = (
    "You are a fair and careful judge of answers written by AI assistants. You follow the output "
    "format you are given exactly."
)

# The question (and the reference, when there is one), as both default templates show them.
_QUESTION_BLOCK = """
[Question]
{{ question }}
{% if reference %}
[Reference answer]
{{ reference }}
{% endif %}
"""

DEFAULT_POINTWISE_TEMPLATE = (
    """\
Judge the quality of the answer below to the user's question: is it correct, helpful, relevant and \
as detailed as the question needs?
{%- if reference %} A reference answer, known to be correct, is given to compare it with.{% endif %}
Explain your judgement in a few sentences, then on the last line give a rating from {{ scale_min }} \
(worst) to {{ scale_max }} (best) in exactly this format: Rating: [[N]]
"""
    + _QUESTION_BLOCK
    + """[Answer]
{{ answer }}
"""
)

DEFAULT_PAIRWISE_TEMPLATE = (
    """\
Compare the answers of two AI assistants, A and B, to the user's question below and decide which \
one answers it better: more correct, helpful and relevant.
{%- if reference %} A reference answer, known to be correct, is given to compare them with.{% endif %}
The order in which the answers appear and their length must not influence you.
Explain your judgement in a few sentences, then on the last line give your verdict in exactly this \
format: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie.
"""
    + _QUESTION_BLOCK
    + """[Answer of assistant A]
{{ answer_1 }}

[Answer of assistant B]
{{ answer_2 }}
"""
)

_NUMBER = r"([+-]?\d+(?:\.\d+)?)"
DEFAULT_RATING_PATTERNS: tuple[str, ...] = (
    rf"Rating:\s*\[\[\s*{_NUMBER}\s*\]\]",
    # Judges often wrap the label in Markdown (**Rating:** [[7]]) or drop it.
    rf"\[\[\s*{_NUMBER}\s*\]\]",
    rf"(?i:\brating)(?:\s*is)?[\s*:=]*{_NUMBER}",
)
"""Tried in order; the last match of the first pattern that matches is the rating."""

DEFAULT_VERDICT_PATTERNS: tuple[str, ...] = (r"\[\[\s*([A-Ca-c])\s*\]\]",)
"""Tried in order; the last match of the first pattern that matches is the verdict."""

# The tasks' renderer: sandboxed, StrictUndefined (a missing value is an error naming it).
_RENDERER = DocRenderer((), has_choices=False)


class JudgeError(EvalError, ValueError):
    """A judge rubric is invalid (a pattern without a capture group, an empty scale, a bad template)."""


def _as_tuple(patterns: str | Sequence[str]) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _compile_patterns(patterns: tuple[str, ...], what: str) -> tuple[re.Pattern[str], ...]:
    if not patterns:
        raise JudgeError(f"a {what} rubric needs at least one pattern to read the judge's reply with")
    compiled = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern, re.MULTILINE)
        except re.error as err:
            raise JudgeError(f"{what} pattern {pattern!r} is not a valid regular expression: {err}") from err
        if regex.groups < 1:
            raise JudgeError(f"{what} pattern {pattern!r} needs a capture group around the verdict")
        compiled.append(regex)
    return tuple(compiled)


def _check_template(template: str, what: str) -> None:
    """Fail at construction, not at the first sample, on a template that does not parse."""
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise JudgeError(
            f"{what} judge template has a syntax error on line {err.lineno}: {err.message}"
        ) from err


def last_match(patterns: tuple[re.Pattern[str], ...], reply: str) -> str | None:
    """The first capture group of the last match of the first pattern that matches ``reply`` at all.

    The last match, because a judge that restates the format before its verdict ("I must answer with
    [[A]], [[B]] or [[C]] ... [[B]]") puts its real verdict last.
    """
    for pattern in patterns:
        matches = list(pattern.finditer(reply))
        if matches:
            group = matches[-1].group(1)
            return None if group is None else str(group)
    return None


@dataclass(frozen=True)
class PointwiseRubric:
    """How the judge scores one answer: the prompt it gets and how its rating is read.

    The template sees ``question``, ``answer``, ``reference`` (``None`` when the sample has none),
    ``scale_min``, ``scale_max`` and the sample's ``extra`` values.

    Attributes:
        template: The jinja2 template of the user turn (default: asks for ``Rating: [[N]]``).
        system: The system prompt, or ``None`` for none.
        patterns: Regular expressions, each with a capture group around the number, tried in order;
            one string is accepted for a single pattern.
        scale: The lowest and highest valid rating; a rating outside it is a parse failure.
    """

    template: str = DEFAULT_POINTWISE_TEMPLATE
    system: str | None = DEFAULT_SYSTEM_PROMPT
    patterns: tuple[str, ...] = DEFAULT_RATING_PATTERNS
    scale: tuple[float, float] = (1, 10)
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", _as_tuple(self.patterns))
        low, high = self.scale
        if not low < high:
            raise JudgeError(f"a rating scale needs its lowest value below its highest, got {self.scale}")
        object.__setattr__(self, "_regexes", _compile_patterns(self.patterns, "rating"))
        _check_template(self.template, "pointwise")

    def prompt(self, values: Mapping[str, Any], index: int) -> str:
        """The user turn for one sample (``values`` as the template sees them, without the scale)."""
        low, high = (int(v) if float(v).is_integer() else v for v in self.scale)
        values = {**values, "scale_min": low, "scale_max": high}
        return _RENDERER.render(self.template, values, doc_id=index, what="judge")

    def parse(self, reply: str) -> tuple[float | None, str | None]:
        """Read the rating from a judge's reply.

        Returns:
            ``(rating, None)``, or ``(None, why)`` when no pattern matches or the rating is off the scale.
        """
        found = last_match(self._regexes, reply)
        if found is None:
            return None, "no rating found in the reply"
        try:
            rating = float(found)
        except ValueError:
            return None, f"rating {found!r} is not a number"
        if not math.isfinite(rating):
            return None, f"rating {found!r} is not a finite number"
        low, high = self.scale
        if not low <= rating <= high:
            return None, f"rating {found} is outside the scale {low:g}..{high:g}"
        return rating, None


@dataclass(frozen=True)
class PairwiseRubric:
    """How the judge compares two answers: the prompt it gets and how its verdict is read.

    The template sees ``question``, ``answer_1`` (the answer shown first), ``answer_2``, ``reference``
    (``None`` when the sample has none) and the sample's ``extra`` values. Which model's answer is in
    which slot is the judge's business only: every pair is asked in both orders.

    Attributes:
        template: The jinja2 template of the user turn (default: asks for ``[[A]]``, ``[[B]]`` or ``[[C]]``).
        system: The system prompt, or ``None`` for none.
        patterns: Regular expressions, each with a capture group around the verdict label, tried in
            order; one string is accepted for a single pattern.
        labels: What each captured label (matched without regard to case) means.
    """

    template: str = DEFAULT_PAIRWISE_TEMPLATE
    system: str | None = DEFAULT_SYSTEM_PROMPT
    patterns: tuple[str, ...] = DEFAULT_VERDICT_PATTERNS
    labels: Mapping[str, Verdict] = field(default_factory=lambda: {"A": "first", "B": "second", "C": "tie"})
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", _as_tuple(self.patterns))
        bad = {label: v for label, v in self.labels.items() if v not in ("first", "second", "tie")}
        if bad:
            raise JudgeError(f"verdict labels must mean 'first', 'second' or 'tie', got {bad}")
        object.__setattr__(self, "labels", {k.strip().casefold(): v for k, v in self.labels.items()})
        object.__setattr__(self, "_regexes", _compile_patterns(self.patterns, "verdict"))
        _check_template(self.template, "pairwise")

    def prompt(self, values: Mapping[str, Any], index: int) -> str:
        """The user turn for one ordering of one pair."""
        return _RENDERER.render(self.template, values, doc_id=index, what="judge")

    def parse(self, reply: str) -> tuple[Verdict | None, str | None]:
        """Read the verdict from a judge's reply.

        Returns:
            ``(verdict, None)``, or ``(None, why)`` when no pattern matches or the label means nothing.
        """
        found = last_match(self._regexes, reply)
        if found is None:
            return None, "no verdict found in the reply"
        verdict = self.labels.get(found.strip().casefold())
        if verdict is None:
            return None, f"verdict label {found!r} is none of {sorted(self.labels)}"
        return verdict, None
