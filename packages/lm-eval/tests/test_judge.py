"""The LLM judge: control flow and reply parsing against a scripted judge, then a real tiny model.

The scripted judge is a fake at the protocol boundary (what it replies is the test's input); the
numbers it leads to are checked against win rates and standard errors computed here by hand.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, train_bpe_tokenizer
from lmstack.eval import TemplateError
from lmstack.eval.judge import (
    JudgeError,
    JudgeSample,
    LLMJudge,
    PairSample,
    PairwiseRubric,
    PointwiseRubric,
)
from lmstack.infer import LLM, CompletionOutput, RequestOutput, SamplingParams, TokenizerUnavailableError

Conversation = Sequence[Mapping[str, Any]]


class ScriptedJudge:
    """Replies to each conversation with ``script(user_prompt)``; records every call."""

    def __init__(self, script: Callable[[str], str | RequestOutput]) -> None:
        self.script = script
        self.calls: list[tuple[list[Conversation], SamplingParams | None]] = []

    @property
    def tokenizer(self) -> Any:
        # The judge only chats; a scripted judge has no tokenizer, like a RemoteLLM built without one.
        raise TokenizerUnavailableError("the scripted judge has no tokenizer")

    def chat(
        self, messages: Sequence[Conversation], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        self.calls.append((list(messages), sampling_params))
        outputs = []
        for i, conversation in enumerate(messages):
            reply = self.script(conversation[-1]["content"])
            if isinstance(reply, RequestOutput):
                outputs.append(reply)
            else:
                outputs.append(
                    RequestOutput(str(i), None, [], [CompletionOutput(0, reply, finish_reason="stop")], True)
                )
        return outputs

    def prompts(self) -> list[str]:
        return [conv[-1]["content"] for conv in self.calls[-1][0]]


def _answers(prompt: str) -> tuple[str, str]:
    """The two answers of a default pairwise prompt: (first slot, second slot)."""
    match = re.search(r"\[Answer of assistant A\]\n(.*?)\n\n\[Answer of assistant B\]\n(.*?)\n", prompt, re.S)
    assert match, prompt
    return match.group(1), match.group(2)


# -- pointwise ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Helpful and correct.\nRating: [[7]]", 7.0),
        ("**Rating:** [[8]]", 8.0),
        ("Rating is: 9/10", 9.0),
        ("Rating: [[ 6.5 ]]", 6.5),
        # A judge restating the format before its verdict: the last rating counts.
        ("I must answer as Rating: [[1]] to Rating: [[10]]. Rating: [[4]]", 4.0),
    ],
)
def test_default_rubric_reads_ratings(reply: str, rating: float) -> None:
    assert PointwiseRubric().parse(reply) == (rating, None)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("I would rather not rate this.", "no rating found"),
        ("Rating: [[11]]", "outside the scale 1..10"),
        ("Rating: [[0]]", "outside the scale 1..10"),
        ("", "no rating found"),
    ],
)
def test_default_rubric_reports_unreadable_ratings(reply: str, why: str) -> None:
    rating, failure = PointwiseRubric().parse(reply)
    assert rating is None
    assert failure is not None and why in failure


def test_pointwise_scores_in_one_greedy_batch_and_counts_failures() -> None:
    replies = {
        "a1": "Rating: [[9]]",
        "a2": "**Rating:** [[3]]",
        "a3": "Sorry, I cannot judge this.",
        "a4": "Rating: [[15]]",
        "a5": "Rating: [[6]]",
    }
    judge_model = ScriptedJudge(lambda prompt: replies[re.search(r"\[Answer\]\n(\w+)", prompt).group(1)])
    samples = [
        JudgeSample(f"question {i}?", f"a{i}", reference="gold" if i == 1 else None) for i in range(1, 6)
    ]
    result = LLMJudge(judge_model).score(samples)

    assert len(judge_model.calls) == 1  # every prompt in one protocol call
    conversations, params = judge_model.calls[0]
    assert len(conversations) == 5
    assert params is not None and params.temperature == 0.0
    assert [m["role"] for m in conversations[0]] == ["system", "user"]
    prompts = judge_model.prompts()
    assert "[Reference answer]\ngold" in prompts[0]
    assert "Reference" not in prompts[1]
    assert "from 1 (worst) to 10 (best)" in prompts[0]

    assert [r.rating for r in result.ratings] == [9.0, 3.0, None, None, 6.0]
    assert [r.failure is None for r in result.ratings] == [True, True, False, False, True]
    assert "no rating found" in result.ratings[2].failure
    assert "outside the scale" in result.ratings[3].failure
    assert result.ratings[2].reply == replies["a3"]
    assert result.num_failed == 2 and result.num_parsed == 3
    assert result.failure_rate == pytest.approx(0.4)
    # Failures are left out, not counted as 0.
    assert result.score is not None
    assert result.score.n == 3
    assert result.score.value == pytest.approx(statistics.mean([9, 3, 6]))
    assert result.score.stderr == pytest.approx(statistics.stdev([9, 3, 6]) / math.sqrt(3))


def test_pointwise_all_failed_has_no_score() -> None:
    result = LLMJudge(ScriptedJudge(lambda _: "no idea")).score(
        [JudgeSample("q", "a"), JudgeSample("q", "b")]
    )
    assert result.score is None
    assert result.num_failed == 2


def test_failed_request_and_cut_reply_are_failures() -> None:
    def script(prompt: str) -> str | RequestOutput:
        if "boom" in prompt:
            return RequestOutput(
                "x", None, [], [CompletionOutput(0, "", finish_reason="error")], True, error="OOM"
            )
        return RequestOutput(
            "y", None, [], [CompletionOutput(0, "The answer is fine and", finish_reason="length")], True
        )

    result = LLMJudge(ScriptedJudge(script)).score([JudgeSample("q", "boom"), JudgeSample("q", "fine")])
    assert result.ratings[0].failure == "the judge request failed: OOM"
    assert "cut at max_tokens" in result.ratings[1].failure
    assert result.num_failed == 2


def test_custom_rubric_scale_pattern_and_extra_values() -> None:
    rubric = PointwiseRubric(
        template="Criteria: {{ criteria }}\nQ: {{ question }}\nA: {{ answer }}\n"
        "Score {{ scale_min }}-{{ scale_max }}",
        system=None,
        patterns=r"Score=(\d)",
        scale=(0, 5),
    )
    judge_model = ScriptedJudge(lambda prompt: "Score=0" if "bad" in prompt else "Score=5 Score=4")
    samples = [
        JudgeSample("q", "bad", extra={"criteria": "brevity"}),
        JudgeSample("q", "ok", extra={"criteria": "x"}),
    ]
    result = LLMJudge(
        judge_model, rubric=rubric, sampling_params=SamplingParams(temperature=0.0, max_tokens=7)
    ).score(samples)
    assert judge_model.calls[0][0][0] == [
        {"role": "user", "content": "Criteria: brevity\nQ: q\nA: bad\nScore 0-5"}
    ]
    assert judge_model.calls[0][1].max_tokens == 7
    assert [r.rating for r in result.ratings] == [0.0, 4.0]

    with pytest.raises(TemplateError, match="criteria") as info:
        LLMJudge(judge_model, rubric=rubric).score([JudgeSample("q", "a")])
    assert info.value.field == "criteria"
    assert len(judge_model.calls) == 1  # nothing was sent


def test_captured_text_that_is_not_a_number_is_a_failure() -> None:
    rubric = PointwiseRubric(patterns=r"Grade: (\w+)")
    assert rubric.parse("Grade: excellent") == (None, "rating 'excellent' is not a number")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patterns": r"Rating: \d+"}, JudgeError, "capture group"),
        ({"patterns": "Rating: ([)"}, JudgeError, "not a valid regular expression"),
        ({"patterns": ()}, JudgeError, "at least one pattern"),
        ({"scale": (10, 1)}, JudgeError, "lowest value below"),
        ({"template": "{% if %}"}, JudgeError, "syntax error on line 1"),
    ],
)
def test_invalid_rubrics_are_clear_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PointwiseRubric(**kwargs)


def test_pairwise_rubric_checks_labels() -> None:
    with pytest.raises(JudgeError, match="'first', 'second' or 'tie'"):
        PairwiseRubric(labels={"A": "first", "B": "left"})  # type: ignore[dict-item]


# -- pairwise -------------------------------------------------------------------------------------------
def test_position_biased_judge_gives_half_and_all_ties() -> None:
    """A judge that always prefers the first slot cannot move the win rate."""
    judge_model = ScriptedJudge(lambda _: "The first answer is better. [[A]]")
    samples = [PairSample(f"q{i}", f"good {i}", f"bad {i}") for i in range(6)]
    result = LLMJudge(judge_model).compare(samples, model_a="mine", model_b="theirs")

    assert len(judge_model.calls) == 1 and len(judge_model.calls[0][0]) == 12  # both orders, one call
    assert result.model_a == "mine" and result.model_b == "theirs"
    assert (result.wins, result.losses, result.ties, result.num_failed) == (0, 0, 6, 0)
    assert result.num_inconsistent == 6
    assert result.win_rate is not None
    assert result.win_rate.value == 0.5 and result.win_rate.stderr == 0.0 and result.win_rate.n == 6
    assert result.first_slot_rate == 1.0
    assert all(c.winner == "tie" and not c.consistent for c in result.comparisons)
    assert all((c.verdict_ab, c.verdict_ba) == ("first", "first") for c in result.comparisons)


def test_pairwise_asks_both_orders() -> None:
    judge_model = ScriptedJudge(lambda _: "[[C]]")
    LLMJudge(judge_model).compare([PairSample("q", "answer of A", "answer of B", reference="ref")])
    ab, ba = judge_model.prompts()
    assert _answers(ab) == ("answer of A", "answer of B")
    assert _answers(ba) == ("answer of B", "answer of A")
    assert "[Reference answer]\nref" in ab and "[Reference answer]\nref" in ba


def test_fair_judge_win_rate_and_stderr() -> None:
    """A judge that prefers the correct answer wherever it sits: A's win rate counts ties as half."""

    def script(prompt: str) -> str:
        first, second = (a.startswith("right") for a in _answers(prompt))
        return "[[A]]" if first and not second else "[[B]]" if second and not first else "Equal. [[C]]"

    rng = random.Random(0)
    kinds = [rng.choice([(True, False), (False, True), (True, True), (False, False)]) for _ in range(40)]
    samples = [
        PairSample(f"q{i}", ("right" if a else "wrong") + f" {i}", ("right" if b else "wrong") + f" {i}")
        for i, (a, b) in enumerate(kinds)
    ]
    result = LLMJudge(ScriptedJudge(script)).compare(samples)

    points = [1.0 if a and not b else 0.0 if b and not a else 0.5 for a, b in kinds]
    assert result.wins == points.count(1.0) and result.losses == points.count(0.0)
    assert result.ties == points.count(0.5)
    assert result.num_inconsistent == 0 and result.num_failed == 0
    assert result.win_rate.value == pytest.approx(statistics.mean(points))
    assert result.win_rate.stderr == pytest.approx(statistics.stdev(points) / math.sqrt(len(points)))
    assert result.first_slot_rate == 0.5  # the correct answer sits first as often as second
    winners = {1.0: "a", 0.0: "b", 0.5: "tie"}
    assert [c.winner for c in result.comparisons] == [winners[p] for p in points]
    assert all(c.consistent for c in result.comparisons)


def test_a_verdict_that_changes_with_position_is_a_tie() -> None:
    # With A first the judge picks A; with B first it calls a tie: not the same verdict, so a tie.
    result = LLMJudge(ScriptedJudge(lambda p: "[[A]]" if _answers(p)[0] == "alpha" else "[[C]]")).compare(
        [PairSample("q", "alpha", "beta")]
    )
    (comparison,) = result.comparisons
    assert (comparison.verdict_ab, comparison.verdict_ba) == ("first", "tie")
    assert comparison.winner == "tie" and not comparison.consistent
    assert result.num_inconsistent == 1
    assert result.win_rate.value == 0.5 and result.win_rate.stderr is None  # one pair: no stderr


def test_unreadable_pairwise_verdicts_are_counted_not_scored() -> None:
    def script(prompt: str) -> str:
        first, _ = _answers(prompt)
        if first == "A-unsure":
            return "Hard to say."  # only the A-first order is unreadable
        return "[[a]]" if first.startswith("A") else "[[B]]"  # labels are read without regard to case

    samples = [
        PairSample("q1", "A-good", "B-bad"),
        PairSample("q2", "A-unsure", "B-x"),
        PairSample("q3", "A2", "B2"),
    ]
    result = LLMJudge(ScriptedJudge(script)).compare(samples)
    assert [c.winner for c in result.comparisons] == ["a", None, "a"]
    failed = result.comparisons[1]
    assert failed.failure == "A first: no verdict found in the reply"
    assert failed.verdict_ab is None and failed.verdict_ba == "second"
    assert result.num_failed == 1 and result.wins == 2
    assert result.win_rate.n == 2 and result.win_rate.value == 1.0


def test_empty_input_sends_nothing() -> None:
    judge_model = ScriptedJudge(lambda _: "[[A]]")
    judge = LLMJudge(judge_model)
    assert judge.compare([]).win_rate is None
    assert judge.score([]).score is None
    assert judge_model.calls == []


# -- a real judge model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm() -> Iterator[LLM]:
    rng = random.Random(0)
    words = ["the", "answer", "is", "correct", "wrong", "rating", "better", "question", "good", "one", "ten"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(300)]
    tokenizer = train_bpe_tokenizer(iter(corpus), vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    llm = LLM(model, tokenizer=tokenizer)
    yield llm
    llm.close()


def test_real_judge_model_end_to_end(tiny_llm: LLM) -> None:
    """A real (random) judge: every reply is parsed or counted, and replies are the model's greedy ones."""
    params = SamplingParams(temperature=0.0, max_tokens=12)
    judge = LLMJudge(tiny_llm, sampling_params=params)
    samples = [
        JudgeSample(f"Is {i} one?", f"The answer is {i}.", reference="one" if i % 2 else None)
        for i in range(4)
    ]
    result = judge.score(samples)
    assert len(result.ratings) == 4
    for rating in result.ratings:
        assert (rating.rating is None) != (rating.failure is None)
        if rating.rating is not None:
            assert 1 <= rating.rating <= 10
    assert result.num_failed == sum(r.rating is None for r in result.ratings)

    # The replies are what the model itself says greedily to the same conversations, one at a time.
    rubric = judge.rubric
    for sample, rating in zip(samples, result.ratings, strict=True):
        values = {"question": sample.question, "answer": sample.answer, "reference": sample.reference}
        conversation = [
            {"role": "system", "content": rubric.system},
            {"role": "user", "content": rubric.prompt(values, 0)},
        ]
        (alone,) = tiny_llm.generate([tiny_llm.render_chat(conversation)], params)
        assert rating.reply == alone.outputs[0].text

    duel = judge.compare([PairSample("Is two one?", "No.", "Yes."), PairSample("Ten?", "ten", "one")])
    assert len(duel.comparisons) == 2
    for comparison in duel.comparisons:
        assert (comparison.winner is None) != (comparison.failure is None)
    assert duel.num_failed + duel.wins + duel.losses + duel.ties == 2
