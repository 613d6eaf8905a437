"""The LLM judge (OpenCompass's subjective evaluation) through the LLM protocol.

A judge model — a local :class:`~lmstack.infer.LLM` or a :class:`~lmstack.infer.RemoteLLM` — rates
answers on a rubric (:meth:`LLMJudge.score`) or compares two models' answers with position swapping
(:meth:`LLMJudge.compare`)::

    from lmstack.eval.judge import JudgeSample, LLMJudge, PairSample

    judge = LLMJudge(judge_model)  # greedy; default rubric asks for "Rating: [[N]]", 1..10
    result = judge.score([JudgeSample("What is 2+2?", "4", reference="4")])
    result.score, result.num_failed  # mean rating with its stderr; replies it could not read

    duel = judge.compare([PairSample("What is 2+2?", "4", "5")], model_a="mine", model_b="theirs")
    duel.win_rate  # model A's, ties as half; a verdict that flips with position is a tie

Rubrics (:class:`PointwiseRubric`, :class:`PairwiseRubric`) are jinja2 templates plus the regular
expressions that read the judge's reply; a reply they cannot read is a counted failure, never a 0.
"""

from __future__ import annotations

from lmstack.eval.judge._judge import (
    Comparison,
    JudgeSample,
    LLMJudge,
    PairSample,
    PairwiseResult,
    PointwiseResult,
    Rating,
    Winner,
)
from lmstack.eval.judge._rubric import (
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_POINTWISE_TEMPLATE,
    DEFAULT_RATING_PATTERNS,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_VERDICT_PATTERNS,
    JudgeError,
    PairwiseRubric,
    PointwiseRubric,
    Verdict,
)

__all__ = [
    "DEFAULT_PAIRWISE_TEMPLATE",
    "DEFAULT_POINTWISE_TEMPLATE",
    "DEFAULT_RATING_PATTERNS",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_VERDICT_PATTERNS",
    "Comparison",
    "JudgeError",
    "JudgeSample",
    "LLMJudge",
    "PairSample",
    "PairwiseResult",
    "PairwiseRubric",
    "PointwiseResult",
    "PointwiseRubric",
    "Rating",
    "Verdict",
    "Winner",
]
