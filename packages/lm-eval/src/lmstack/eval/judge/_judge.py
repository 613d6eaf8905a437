"""The LLM judge: a judge model behind the LLM protocol scores answers or compares two models' answers.

OpenCompass's subjective evaluation, with two guarantees it does not make: a reply the rubric cannot
read is counted and reported as a failure (never a silent 0 or a silent drop), and a pairwise verdict
that changes when the two answers swap places counts as a tie, so a judge that favours one position
cannot move the win rate. All of a call's prompts go to the judge in one batched ``chat`` call, greedy
by default, so a run is reproducible and the engine batches them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.eval.judge._rubric import PairwiseRubric, PointwiseRubric, Verdict
from lmstack.eval.metrics import Score
from lmstack.eval.metrics._stats import mean, mean_stderr
from lmstack.infer import LLMProtocol, RequestOutput, SamplingParams

__all__ = [
    "Comparison",
    "JudgeSample",
    "LLMJudge",
    "PairSample",
    "PairwiseResult",
    "PointwiseResult",
    "Rating",
    "Winner",
]

Winner = Literal["a", "b", "tie"]
"""Which model a pair went to after both orders were judged."""

# Long enough for a short justification and the verdict line; a reply cut short is a counted failure.
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True)
class JudgeSample:
    """One answer to score.

    Attributes:
        question: What the model was asked.
        answer: The model's answer.
        reference: A correct answer to compare with, if there is one.
        extra: More values for a custom rubric template.
    """

    question: str
    answer: str
    reference: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairSample:
    """Two models' answers to the same question, to compare.

    Attributes:
        question: What both models were asked.
        answer_a: Model A's answer.
        answer_b: Model B's answer.
        reference: A correct answer to compare with, if there is one.
        extra: More values for a custom rubric template.
    """

    question: str
    answer_a: str
    answer_b: str
    reference: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rating:
    """The judge's rating of one answer.

    Attributes:
        index: The sample's position in the input.
        rating: The rating read from the reply, or ``None`` when it could not be read.
        reply: The judge's whole reply.
        failure: Why no rating was read (``None`` when one was).
    """

    index: int
    rating: float | None
    reply: str
    failure: str | None = None


@dataclass(frozen=True)
class PointwiseResult:
    """Ratings of a set of answers.

    Attributes:
        ratings: One per sample, in the input's order.
        score: The mean rating over the replies that were read, with its standard error (``None``
            with fewer than two), or ``None`` when no reply was read.
        num_failed: Replies whose rating could not be read; they are left out of ``score``.
    """

    ratings: tuple[Rating, ...]
    score: Score | None
    num_failed: int

    @property
    def num_parsed(self) -> int:
        """Replies whose rating was read."""
        return len(self.ratings) - self.num_failed

    @property
    def failure_rate(self) -> float:
        """The fraction of replies that could not be read (0 for no samples)."""
        return self.num_failed / len(self.ratings) if self.ratings else 0.0


@dataclass(frozen=True)
class Comparison:
    """One pair, judged in both orders.

    Attributes:
        index: The pair's position in the input.
        verdict_ab: The verdict with model A's answer shown first (``None`` if unreadable).
        verdict_ba: The verdict with model B's answer shown first (``None`` if unreadable).
        winner: ``"a"`` or ``"b"`` when both orders name the same model, otherwise ``"tie"``;
            ``None`` when either verdict could not be read.
        replies: The judge's replies, A-first then B-first.
        failure: Why the pair has no winner (``None`` when it has one).
    """

    index: int
    verdict_ab: Verdict | None
    verdict_ba: Verdict | None
    winner: Winner | None
    replies: tuple[str, str]
    failure: str | None = None

    @property
    def consistent(self) -> bool:
        """Whether both orders gave the same verdict about the models (a flip with position is not)."""
        return self.winner is not None and _model_verdict(self.verdict_ab, "a") == _model_verdict(
            self.verdict_ba, "b"
        )


@dataclass(frozen=True)
class PairwiseResult:
    """Model A against model B over a set of pairs.

    Attributes:
        model_a: Model A's name.
        model_b: Model B's name.
        comparisons: One per pair, in the input's order.
        win_rate: Model A's win rate over the pairs with a winner, ties counting half, with the
            standard error of that mean (``None`` with fewer than two); ``None`` when no pair has one.
        wins: Pairs model A won in both orders.
        losses: Pairs model B won in both orders.
        ties: Pairs judged a tie, including those whose verdict flipped with position.
        num_inconsistent: Pairs whose verdict changed when the answers swapped places (among ``ties``).
        num_failed: Pairs with a reply that could not be read; they are left out of ``win_rate``.
        first_slot_rate: Of the readable verdicts that were not ties, the fraction that preferred the
            answer shown first (0.5 for a judge without position bias; ``None`` if there were none).
    """

    model_a: str
    model_b: str
    comparisons: tuple[Comparison, ...]
    win_rate: Score | None
    wins: int
    losses: int
    ties: int
    num_inconsistent: int
    num_failed: int
    first_slot_rate: float | None


def _model_verdict(verdict: Verdict | None, first: Winner) -> Winner | None:
    """A slot verdict as a verdict about the models, given which model's answer was shown first."""
    if verdict is None or verdict == "tie":
        return verdict
    other: Winner = "b" if first == "a" else "a"
    return first if verdict == "first" else other


def _reply(output: RequestOutput) -> tuple[str, str | None]:
    """The reply's text, and why it cannot hold a verdict when the request itself failed."""
    if output.error is not None:
        return "", f"the judge request failed: {output.error}"
    if not output.outputs:
        return "", "the judge returned no reply"
    return output.outputs[0].text, None


def _cut_short(output: RequestOutput, why: str) -> str:
    if output.outputs and output.outputs[0].finish_reason == "length":
        return f"{why} (the reply was cut at max_tokens)"
    return why


def _mean_score(values: Sequence[float]) -> Score | None:
    if not values:
        return None
    stderr = mean_stderr(values) if len(values) >= 2 else None
    return Score(value=mean(values), stderr=stderr, n=len(values))


class LLMJudge:
    """A judge model behind the LLM protocol (a local ``LLM`` or a ``RemoteLLM``).

    Args:
        model: The judge model.
        rubric: How answers are scored (default: :class:`PointwiseRubric`, 1..10 as ``Rating: [[N]]``).
        pairwise_rubric: How two answers are compared (default: :class:`PairwiseRubric`,
            ``[[A]]`` / ``[[B]]`` / ``[[C]]``).
        sampling_params: How the judge replies (default: greedy, ``max_tokens=1024``).

    Example:
        >>> judge = LLMJudge(LLM("judge-model"))  # doctest: +SKIP
        >>> judge.score([JudgeSample("What is 2+2?", "4")]).score  # doctest: +SKIP
        >>> pairs = [PairSample("What is 2+2?", "4", "5")]
        >>> judge.compare(pairs, model_a="m1", model_b="m2").win_rate  # doctest: +SKIP
    """

    def __init__(
        self,
        model: LLMProtocol,
        *,
        rubric: PointwiseRubric | None = None,
        pairwise_rubric: PairwiseRubric | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> None:
        self.model = model
        self.rubric = rubric or PointwiseRubric()
        self.pairwise_rubric = pairwise_rubric or PairwiseRubric()
        self.sampling_params = sampling_params or SamplingParams(
            temperature=0.0, max_tokens=DEFAULT_MAX_TOKENS
        )

    def _ask(self, system: str | None, prompts: Sequence[str]) -> list[RequestOutput]:
        """Every prompt to the judge in one batched chat call; replies in the prompts' order."""
        if not prompts:
            return []
        head = [] if system is None else [{"role": "system", "content": system}]
        conversations = [[*head, {"role": "user", "content": prompt}] for prompt in prompts]
        return self.model.chat(conversations, self.sampling_params)

    def score(self, samples: Sequence[JudgeSample]) -> PointwiseResult:
        """Rate each answer on the rubric's scale.

        Args:
            samples: The answers to rate.

        Returns:
            Each rating (or why it could not be read), and their mean with its standard error.

        Raises:
            TemplateError: The rubric's template uses a value a sample does not provide (before any
                prompt is sent).
        """
        prompts = [
            self.rubric.prompt(
                {**s.extra, "question": s.question, "answer": s.answer, "reference": s.reference}, i
            )
            for i, s in enumerate(samples)
        ]
        ratings = []
        for i, output in enumerate(self._ask(self.rubric.system, prompts)):
            text, failure = _reply(output)
            value = None
            if failure is None:
                value, failure = self.rubric.parse(text)
                failure = None if failure is None else _cut_short(output, failure)
            ratings.append(Rating(index=i, rating=value, reply=text, failure=failure))
        read = [r.rating for r in ratings if r.rating is not None]
        return PointwiseResult(
            ratings=tuple(ratings), score=_mean_score(read), num_failed=len(ratings) - len(read)
        )

    def _verdict(self, output: RequestOutput) -> tuple[str, Verdict | None, str | None]:
        text, failure = _reply(output)
        if failure is not None:
            return text, None, failure
        verdict, failure = self.pairwise_rubric.parse(text)
        return text, verdict, None if failure is None else _cut_short(output, failure)

    def compare(
        self, samples: Sequence[PairSample], *, model_a: str = "a", model_b: str = "b"
    ) -> PairwiseResult:
        """Compare model A's and model B's answers, each pair judged with A first and with B first.

        A pair goes to a model only when both orders name it; any other pair of readable verdicts
        (a flip with position, a tie in either order) is a tie. A pair with an unreadable verdict is
        counted in ``num_failed`` and left out of the win rate.

        Args:
            samples: The pairs.
            model_a: Model A's name, for reports.
            model_b: Model B's name, for reports.

        Returns:
            The comparisons and model A's win rate (ties as half) with its standard error.

        Raises:
            TemplateError: The rubric's template uses a value a sample does not provide (before any
                prompt is sent).
        """
        prompts = []
        for i, s in enumerate(samples):
            base = {**s.extra, "question": s.question, "reference": s.reference}
            prompts.append(
                self.pairwise_rubric.prompt({**base, "answer_1": s.answer_a, "answer_2": s.answer_b}, i)
            )
            prompts.append(
                self.pairwise_rubric.prompt({**base, "answer_1": s.answer_b, "answer_2": s.answer_a}, i)
            )
        outputs = self._ask(self.pairwise_rubric.system, prompts)
        comparisons = [
            self._combine(i, self._verdict(outputs[2 * i]), self._verdict(outputs[2 * i + 1]))
            for i in range(len(samples))
        ]
        return _summarise(model_a, model_b, comparisons)

    @staticmethod
    def _combine(
        index: int, ab: tuple[str, Verdict | None, str | None], ba: tuple[str, Verdict | None, str | None]
    ) -> Comparison:
        (reply_ab, verdict_ab, fail_ab), (reply_ba, verdict_ba, fail_ba) = ab, ba
        failures = [f"{order}: {why}" for order, why in (("A first", fail_ab), ("B first", fail_ba)) if why]
        winner: Winner | None = None
        if not failures:
            first, second = _model_verdict(verdict_ab, "a"), _model_verdict(verdict_ba, "b")
            winner = first if first == second else "tie"
        return Comparison(
            index=index,
            verdict_ab=verdict_ab,
            verdict_ba=verdict_ba,
            winner=winner,
            replies=(reply_ab, reply_ba),
            failure="; ".join(failures) or None,
        )


def _summarise(model_a: str, model_b: str, comparisons: Sequence[Comparison]) -> PairwiseResult:
    points = {"a": 1.0, "tie": 0.5, "b": 0.0}
    decided = [c for c in comparisons if c.winner is not None]
    slots = [v for c in comparisons for v in (c.verdict_ab, c.verdict_ba) if v in ("first", "second")]
    return PairwiseResult(
        model_a=model_a,
        model_b=model_b,
        comparisons=tuple(comparisons),
        win_rate=_mean_score([points[c.winner] for c in decided if c.winner is not None]),
        wins=sum(c.winner == "a" for c in decided),
        losses=sum(c.winner == "b" for c in decided),
        ties=sum(c.winner == "tie" for c in decided),
        num_inconsistent=sum(not c.consistent for c in decided),
        num_failed=len(comparisons) - len(decided),
        first_slot_rate=slots.count("first") / len(slots) if slots else None,
    )
