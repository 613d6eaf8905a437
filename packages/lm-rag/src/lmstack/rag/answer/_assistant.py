"""The assistant: retrieve, gate, and answer from numbered passages with citations (LLM protocol)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmstack.infer import LLMProtocol, SamplingParams
from lmstack.rag._errors import AnswerError, RAGConfigError
from lmstack.rag._types import Hit
from lmstack.rag.answer._citations import CitationFilter, cited_numbers, clean_citations

if TYPE_CHECKING:
    from lmstack.rag._index import Index, Retrieval

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_REFUSAL",
    "Answer",
    "AnswerEvent",
    "Assistant",
    "Citation",
]

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Answer the question using only the numbered context passages, citing them as [1], [2]. "
    'If the context does not say, reply "The context does not say."'
)
"""The instruction that opens the prompt; ``{refusal}`` in a custom one is not needed."""

DEFAULT_REFUSAL = "Sorry, I can only answer questions about the documents I have been given."
"""What the assistant says when the gate finds a question unrelated to the collection."""

_CONTEXT_REFUSAL = "The context does not say."


@dataclass(frozen=True)
class Citation:
    """A passage an answer cites.

    Attributes:
        number: The passage's number in the prompt (what ``[n]`` in the answer refers to).
        source: The document it came from.
        text: The passage.
        score: Its retrieval score.
        metadata: The hit's metadata (headings, page, chunk id ...).
    """

    number: int
    source: str
    text: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """The assistant's reply to one question.

    Attributes:
        question: The question.
        text: The answer, with ``[n]`` citations of shown passages only (or the refusal).
        citations: The passages the answer cites, in order of first citation.
        refused: True when the assistant did not answer: the gate found the question unrelated, nothing
            was retrieved, or the model said the passages do not answer it.
        reason: Why it refused: ``"unrelated"``, ``"no passages"`` or ``"not in the passages"``; None when
            it answered.
        passages: Every passage shown to the model, numbered from 1 in this order.
        relevance: The gate's probability that the question is about the collection (None uncalibrated).
    """

    question: str
    text: str
    citations: list[Citation]
    refused: bool
    reason: str | None
    passages: list[Hit]
    relevance: float | None

    def to_dict(self) -> dict[str, Any]:
        """The answer as JSON-able data (what ``/query`` returns)."""
        return {
            "question": self.question,
            "answer": self.text,
            "refused": self.refused,
            "reason": self.reason,
            "relevance": self.relevance,
            "citations": [
                {
                    "number": c.number,
                    "source": c.source,
                    "text": c.text,
                    "score": c.score,
                    "metadata": dict(c.metadata),
                }
                for c in self.citations
            ],
            "passages": [{"source": h.source, "score": h.score, "text": h.text} for h in self.passages],
        }


@dataclass(frozen=True)
class AnswerEvent:
    """One event of a streamed answer.

    Attributes:
        type: ``"passages"`` (first: what was retrieved, in ``answer.passages``), ``"delta"`` (new answer
            text in ``text``) or ``"done"`` (last: the whole ``answer``).
        text: The new text of a ``delta``.
        answer: For ``passages``, the answer so far with no text; for ``done``, the final answer.
    """

    type: str
    text: str = ""
    answer: Answer | None = None


def _title(hit: Hit) -> str:
    headings = hit.metadata.get("headings") or []
    if headings:
        return " > ".join(str(h) for h in headings)
    return str(hit.metadata.get("title") or hit.source)


def _body(hit: Hit) -> str:
    """The passage text on one line, without the heading lines the chunker put in front of it."""
    lines = hit.text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return re.sub(r"\s+", " ", " ".join(lines)).strip() or re.sub(r"\s+", " ", hit.text).strip()


class Assistant:
    """Answer questions from an :class:`~lmstack.rag.Index` with any model behind the LLM protocol.

    Each question is searched (hybrid by default); if the index's gate finds it unrelated to the collection
    the assistant refuses politely (or, in group chats, stays silent) without calling the model; otherwise the
    top passages go to the model numbered ``[1]..[k]`` and the answer comes back with its citations mapped to
    sources (citations of passages that were never shown are removed).

    Args:
        index: The index to search.
        llm: A local :class:`~lmstack.infer.LLM` or a :class:`~lmstack.infer.RemoteLLM`.
        k: Passages per question.
        instruction: The line that opens the prompt.
        refusal: What to say to unrelated questions.
        sampling_params: How to generate (default: greedy, at most 256 tokens).
        use_gate: Refuse unrelated questions (needs a calibrated index; uncalibrated indexes answer all).
        mode: The search mode (``hybrid``, ``dense``, ``bm25``).
        max_prompt_tokens: Drop the lowest-ranked passages until the prompt fits this many tokens of the
            model's tokenizer (None: keep all k).
        system_prompt: An optional system message.
        search_kwargs: More arguments for :meth:`Index.retrieve` (filters, rerank, diversity).
    """

    def __init__(
        self,
        index: Index,
        llm: LLMProtocol,
        *,
        k: int = 4,
        instruction: str = DEFAULT_INSTRUCTION,
        refusal: str = DEFAULT_REFUSAL,
        sampling_params: SamplingParams | None = None,
        use_gate: bool = True,
        mode: str = "hybrid",
        max_prompt_tokens: int | None = None,
        system_prompt: str | None = None,
        search_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if k < 1:
            raise RAGConfigError(f"k must be at least 1, not {k}", field="k")
        self.index = index
        self.llm = llm
        self.k = k
        self.instruction = instruction
        self.refusal = refusal
        self.sampling_params = sampling_params or SamplingParams(max_tokens=256, temperature=0.0)
        self.use_gate = use_gate
        self.mode = mode
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt
        self.search_kwargs = dict(search_kwargs or {})

    # -- prompt ---------------------------------------------------------------------------------------
    def prompt(self, question: str, passages: Sequence[Hit]) -> str:
        """The user message: the instruction, the numbered passages and the question."""
        context = "\n".join(f"[{n}] {_title(hit)}: {_body(hit)}" for n, hit in enumerate(passages, start=1))
        return f"{self.instruction}\n\nContext:\n{context}\n\nQuestion: {question}"

    def messages(
        self, question: str, passages: Sequence[Hit], history: Sequence[Mapping[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        """The conversation sent to the model (system prompt, history, then the prompt)."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages += [dict(m) for m in history]
        messages.append({"role": "user", "content": self.prompt(question, passages)})
        return messages

    def _fit(self, question: str, passages: list[Hit]) -> list[Hit]:
        if self.max_prompt_tokens is None:
            return passages
        try:
            tokenizer = self.llm.tokenizer
        except Exception as error:  # a RemoteLLM without a tokenizer: nothing to count with
            logger.warning("max_prompt_tokens ignored: the model has no tokenizer here (%s)", error)
            return passages
        while (
            len(passages) > 1
            and len(tokenizer.encode(self.prompt(question, passages))) > self.max_prompt_tokens
        ):
            passages = passages[:-1]
        return passages

    # -- answering ------------------------------------------------------------------------------------
    def _retrieve(self, question: str) -> Retrieval:
        if not isinstance(question, str) or not question.strip():
            raise RAGConfigError("the question is empty", field="question")
        return self.index.retrieve(question, self.k, mode=self.mode, **self.search_kwargs)

    def _refusal(self, question: str, retrieval: Retrieval) -> Answer | None:
        if self.use_gate and not retrieval.relevant:
            return Answer(question, self.refusal, [], True, "unrelated", [], retrieval.probability)
        if not retrieval.hits:
            return Answer(question, self.refusal, [], True, "no passages", [], retrieval.probability)
        return None

    def _finish(self, question: str, raw: str, passages: list[Hit], relevance: float | None) -> Answer:
        text = clean_citations(raw.strip(), len(passages))
        citations = [
            Citation(
                n,
                passages[n - 1].source,
                passages[n - 1].text,
                passages[n - 1].score,
                passages[n - 1].metadata,
            )
            for n in cited_numbers(text)
        ]
        said_no = text.rstrip(".").strip().lower() == _CONTEXT_REFUSAL.rstrip(".").lower()
        reason = "not in the passages" if said_no else None
        return Answer(question, text, citations, said_no, reason, passages, relevance)

    def ask(self, question: str, *, history: Sequence[Mapping[str, Any]] = ()) -> Answer:
        """Answer one question (blocking).

        Args:
            question: The question.
            history: Earlier turns of the conversation (OpenAI messages), sent before the prompt.

        Returns:
            The answer with its citations, or the refusal.
        """
        retrieval = self._retrieve(question)
        refused = self._refusal(question, retrieval)
        if refused is not None:
            return refused
        passages = self._fit(question, list(retrieval.hits))
        output = self.llm.chat(self.messages(question, passages, history), self.sampling_params)[0]
        if output.error:
            raise AnswerError(f"the model failed to answer {question!r}: {output.error}")
        return self._finish(question, output.outputs[0].text, passages, retrieval.probability)

    async def stream(
        self, question: str, *, history: Sequence[Mapping[str, Any]] = ()
    ) -> AsyncIterator[AnswerEvent]:
        """Answer one question as a stream of events: the passages, text deltas, then the final answer.

        Citations of passages that were not shown never reach the stream (they are held back and dropped).
        """
        retrieval = await asyncio.to_thread(self._retrieve, question)
        refused = self._refusal(question, retrieval)
        if refused is not None:
            yield AnswerEvent("delta", refused.text)
            yield AnswerEvent("done", answer=refused)
            return
        passages = await asyncio.to_thread(self._fit, question, list(retrieval.hits))
        yield AnswerEvent(
            "passages", answer=Answer(question, "", [], False, None, passages, retrieval.probability)
        )
        cleaner = CitationFilter(len(passages))
        raw = []
        stream = self.llm.stream(self.messages(question, passages, history), self.sampling_params)
        try:
            async for update in stream:
                if update.error:
                    raise AnswerError(f"the model failed to answer {question!r}: {update.error}")
                delta = update.outputs[0].text
                raw.append(delta)
                shown = cleaner.feed(delta)
                if shown:
                    yield AnswerEvent("delta", shown)
        finally:
            # Closing the model's stream cancels its request, also when our caller stops reading early.
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        rest = cleaner.finish()
        if rest:
            yield AnswerEvent("delta", rest)
        yield AnswerEvent(
            "done", answer=self._finish(question, "".join(raw), passages, retrieval.probability)
        )
