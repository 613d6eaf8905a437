"""Assistant: prompts, citations, refusals and streaming, with a scripted model and a real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lmstack.infer import LLM, CompletionOutput, RequestOutput, SamplingParams
from lmstack.rag import Assistant, Index
from lmstack.rag.answer import CitationFilter, clean_citations


class ScriptedLLM:
    """Replies with a fixed text (the model is not what these tests are about); counts its calls."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[list[dict]] = []

    @property
    def tokenizer(self):
        raise NotImplementedError

    def _output(self, text: str, finished: bool) -> RequestOutput:
        return RequestOutput(
            "r", None, [], [CompletionOutput(0, text, finish_reason="stop" if finished else None)], finished
        )

    def chat(self, messages, sampling_params=None):
        self.calls.append(list(messages))
        return [self._output(self.reply, True)]

    async def stream(self, prompt, sampling_params=None) -> AsyncIterator[RequestOutput]:
        self.calls.append(list(prompt))
        pieces = [self.reply[i : i + 3] for i in range(0, len(self.reply), 3)]
        for n, piece in enumerate(pieces):
            yield self._output(piece, n == len(pieces) - 1)

    def generate(self, prompts, sampling_params=None):
        raise NotImplementedError

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, texts, **kwargs):
        raise NotImplementedError


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, make_corpus, embedder):
    root = tmp_path_factory.mktemp("assistant")
    topics = make_corpus(root / "docs", 40, seed=3)
    built = Index.create(root / "index", embedder=embedder)
    built.ingest(root / "docs", use_tqdm=False)
    names = [name for name, _ in topics.values()]
    related = [f"When was {n} first recorded?" for n in names[:20]] + [
        f"What colour is {n}?" for n in names[20:]
    ]
    unrelated = [
        "How do I boil an egg?", "What is the capital of France?", "Who won the match yesterday?",
        "Can someone review my pull request?", "good morning everyone", "What time is lunch?",
        "How many legs does a spider have?", "Is it going to rain tomorrow?", "Who wrote Hamlet?",
        "Recommend a good novel", "How do I install numpy on Windows?", "thanks!",
    ]  # fmt: skip
    built.calibrate(related, unrelated, use_tqdm=False)
    yield built, topics
    built.close()


def test_answer_keeps_only_citations_of_shown_passages(index) -> None:
    built, topics = index
    name, facts = topics["doc004"]
    llm = ScriptedLLM(f"{name} was first recorded in {facts['year']} [1] [9], as letters say [2, 7].")
    answer = Assistant(built, llm, k=3).ask(f"When was {name} first recorded?")
    assert not answer.refused and len(llm.calls) == 1
    assert answer.text == f"{name} was first recorded in {facts['year']} [1], as letters say [2]."
    assert [c.number for c in answer.citations] == [1, 2]
    assert answer.citations[0].source == answer.passages[0].source == "docs/doc004.md"
    prompt = llm.calls[0][-1]["content"]
    assert prompt.startswith("Answer the question using only") and f"Question: When was {name}" in prompt
    assert "[1] " in prompt and "[3] " in prompt and "[4] " not in prompt


def test_unrelated_questions_are_refused_without_calling_the_model(index) -> None:
    built, _ = index
    llm = ScriptedLLM("should not be said")
    answer = Assistant(built, llm).ask("What is the best way to cook rice?")
    assert answer.refused and answer.reason == "unrelated" and llm.calls == []
    assert Assistant(built, llm, use_gate=False).ask("What is the best way to cook rice?").refused is False


def test_a_model_saying_the_context_does_not_tell_is_a_refusal(index) -> None:
    built, topics = index
    answer = Assistant(built, ScriptedLLM("The context does not say.")).ask(
        f"Who built {topics['doc001'][0]}?"
    )
    assert answer.refused and answer.reason == "not in the passages" and answer.citations == []


def test_stream_equals_ask(index) -> None:
    built, topics = index
    name, facts = topics["doc010"]
    reply = f"It is {facts['colour']} [2][8] and old [1]."
    assistant = Assistant(built, ScriptedLLM(reply), k=2)

    async def collect():
        return [event async for event in assistant.stream(f"What colour is {name}?")]

    events = asyncio.run(collect())
    assert events[0].type == "passages" and events[-1].type == "done"
    streamed = "".join(e.text for e in events if e.type == "delta")
    final = events[-1].answer
    assert streamed == final.text == clean_citations(reply, 2) == f"It is {facts['colour']} [2] and old [1]."
    assert final.to_dict() == assistant.ask(f"What colour is {name}?").to_dict()


@pytest.mark.parametrize(
    "text", ["A [1] b [3].", "[12] x [2, 1, 5] y", "no citations", "open [2 never closed", "[] [a]"]
)
def test_citation_filter_matches_whole_text_cleaning_for_any_split(text: str) -> None:
    for size in range(1, 6):
        f = CitationFilter(2)
        out = "".join(f.feed(text[i : i + size]) for i in range(0, len(text), size)) + f.finish()
        assert out == clean_citations(text, 2)


def test_max_prompt_tokens_drops_the_lowest_ranked_passages(index, tiny_model_dir: Path) -> None:
    built, topics = index
    llm = LLM(str(tiny_model_dir))
    try:
        name = topics["doc002"][0]
        full = Assistant(built, llm, k=4)
        retrieval = built.retrieve(f"When was {name} first recorded?", 4)
        two = len(llm.tokenizer.encode(full.prompt("q", retrieval.hits[:2])))
        fitted = Assistant(
            built, llm, k=4, max_prompt_tokens=two + 20, sampling_params=SamplingParams(max_tokens=4)
        )
        answer = fitted.ask(f"When was {name} first recorded?")
        assert 1 <= len(answer.passages) <= 3
        assert [h.chunk_id for h in answer.passages] == [
            h.chunk_id for h in retrieval.hits[: len(answer.passages)]
        ]
    finally:
        llm.close()


def test_real_engine_answer_is_the_models_reply_with_citations_cleaned(index, tiny_model_dir: Path) -> None:
    built, topics = index
    llm = LLM(str(tiny_model_dir))
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0)
        assistant = Assistant(built, llm, k=2, sampling_params=params)
        name = topics["doc006"][0]
        answer = assistant.ask(f"When was {name} first recorded?")
        messages = assistant.messages(answer.question, answer.passages)
        direct = llm.chat(messages, params)[0].outputs[0].text
        assert answer.text == clean_citations(direct.strip(), 2)
        assert answer.passages[0].source == "docs/doc006.md"
    finally:
        llm.close()
