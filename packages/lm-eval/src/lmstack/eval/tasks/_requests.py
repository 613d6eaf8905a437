"""The requests a task sends to a model, and what each document is scored against.

A :class:`Request` is exactly what the LLM protocol receives (lm-evaluation-harness's ``Instance``
arguments, typed). Its :attr:`Request.request_hash` is a sha256 over the canonical JSON of what is
sent, so that equal requests (from any task or document) share a cache entry, and a changed prompt
never reuses a stale answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from lmstack.eval.tasks._config import GenerationKwargs

__all__ = ["ChatMessage", "DocTarget", "Request", "RequestKind", "prompt_hash"]

RequestKind = Literal["loglikelihood", "generate_until", "loglikelihood_rolling"]


def _sha256_json(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat-template prompt.

    Attributes:
        role: ``system``, ``user`` or ``assistant``.
        content: The turn's text.
    """

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """The ``{"role": ..., "content": ...}`` form the LLM protocol's ``chat`` takes."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Request:
    """One model call of a task.

    Attributes:
        task: The task's name.
        doc_id: The document's index in the evaluated split.
        kind: ``loglikelihood`` (of ``continuation`` after ``context``), ``generate_until`` (complete
            ``context`` with ``generation``), or ``loglikelihood_rolling`` (of the whole ``context``).
        context: The prompt: text, or chat messages when the task is in chat-template mode (render them
            with the model's chat template and a generation prompt). For ``loglikelihood_rolling``, the text
            to score.
        continuation: The scored continuation (``loglikelihood`` only).
        generation: Decoding settings (``generate_until`` only).
        choice_index: For multiple choice, the index of the choice this request scores.
    """

    task: str
    doc_id: int
    kind: RequestKind
    context: str | tuple[ChatMessage, ...]
    continuation: str | None = None
    generation: GenerationKwargs | None = None
    choice_index: int | None = None

    @property
    def is_chat(self) -> bool:
        """Whether the context is chat messages."""
        return not isinstance(self.context, str)

    def messages(self) -> list[dict[str, str]]:
        """The context as chat messages (raises ``TypeError`` for a text context)."""
        if isinstance(self.context, str):
            raise TypeError("this request's context is text, not chat messages")
        return [message.as_dict() for message in self.context]

    def payload(self) -> dict[str, Any]:
        """What is sent to the model, as canonical JSON-able data (the task and doc id are not part of it)."""
        context: Any = self.context if isinstance(self.context, str) else self.messages()
        return {
            "kind": self.kind,
            "context": context,
            "continuation": self.continuation,
            "generation": None if self.generation is None else self.generation.as_dict(),
        }

    @cached_property
    def request_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`payload`: stable across runs and machines."""
        return _sha256_json(self.payload())


@dataclass(frozen=True)
class DocTarget:
    """What one document's outputs are scored against.

    Attributes:
        doc_id: The document's index in the evaluated split.
        text: The answer text, or several acceptable answers (lm-eval's multiple targets); for
            ``loglikelihood_rolling``, the scored text.
        gold: For a task with choices, the index (or indices) of the right choice(s); else None.
        choices: The document's choices, when the task has them.
    """

    doc_id: int
    text: str | tuple[str, ...]
    gold: int | tuple[int, ...] | None = None
    choices: tuple[str, ...] | None = None


def prompt_hash(requests: Sequence[Request]) -> str:
    """sha256 (hex) over a task's requests in order: equal exactly when every prompt sent is equal."""
    digest = hashlib.sha256()
    for request in requests:
        digest.update(f"{request.doc_id}:{request.choice_index}:{request.request_hash}\n".encode())
    return digest.hexdigest()
