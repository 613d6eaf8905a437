"""Answering chat messages: the group-chat silence rule, and one answer per message however often it is sent.

Chat platforms retry a delivery they think failed (Feishu after 3 s without a reply), so the same message can
arrive several times, even while the first delivery is still being answered; :class:`ReplyCache` makes every
copy share the first one's answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lmstack.rag.answer import Answer, Assistant

__all__ = ["ChatReply", "ReplyCache", "answer_message", "reply_text"]

_T = TypeVar("_T")
_NOT_ANSWERED = ("unrelated", "no passages")  # refusals that mean "not about the documents"


@dataclass(frozen=True)
class ChatReply:
    """What to say to one chat message.

    Attributes:
        reply: The answer (or the refusal in a direct chat); None: stay silent.
        relevant: Whether the relevance gate found the message about the documents.
        citations: ``{"number", "source", "score"}`` of each passage the answer cites.
    """

    reply: str | None
    relevant: bool
    citations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The reply as JSON-able data (what ``/webhook`` returns)."""
        return {"reply": self.reply, "relevant": self.relevant, "citations": self.citations}


def _reply(answer: Answer, *, group: bool, silent: bool) -> ChatReply:
    relevant = not (answer.refused and answer.reason in _NOT_ANSWERED)
    if not relevant and group and silent:
        return ChatReply(None, False)
    citations = [{"number": c.number, "source": c.source, "score": c.score} for c in answer.citations]
    return ChatReply(answer.text, relevant, citations)


async def answer_message(assistant: Assistant, text: str, *, group: bool, silent: bool) -> ChatReply:
    """Answer one chat message (the blocking model call runs in a worker thread).

    Args:
        assistant: What answers.
        text: The message, mentions already removed.
        group: Whether it was said in a group chat.
        silent: Stay silent in group chats when the message is not about the documents.
    """
    answer = await asyncio.to_thread(assistant.ask, text)
    return _reply(answer, group=group, silent=silent)


def reply_text(reply: ChatReply) -> str:
    """The reply as one chat message: the answer, then a line per cited source."""
    assert reply.reply is not None
    sources = [f"[{c['number']}] {c['source']}" for c in reply.citations]
    return reply.reply + ("\n\n" + "\n".join(sources) if sources else "")


class ReplyCache(Generic[_T]):
    """Run each keyed job once within ``ttl_s``; repeats of the key get the first run's result.

    A repeat that arrives while the first run is still going waits for it. A run that fails is forgotten, so
    the platform's next retry runs it again.

    Args:
        ttl_s: How long a result is remembered.
        max_entries: Most keys remembered (the oldest go first).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self, ttl_s: float = 600.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[_T]]] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) <= self.max_entries:
                break
            del self._entries[key]

    def seen(self, key: str) -> bool:
        """Whether ``key`` ran (or is running) within the last ``ttl_s`` seconds."""
        self._prune(self._clock())
        return key in self._entries

    async def run(self, key: str | None, job: Callable[[], Awaitable[_T]]) -> tuple[_T, bool]:
        """The result of ``job``, run once per key; returns it and whether it came from an earlier run.

        Args:
            key: The message's id; None runs ``job`` every time.
            job: What makes the result.
        """
        if key is None:
            return await job(), False
        now = self._clock()
        self._prune(now)
        entry = self._entries.get(key)
        if entry is not None:
            return await asyncio.shield(entry[1]), True
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now + self.ttl_s, future)
        try:
            result = await job()
        except BaseException as exc:
            self._entries.pop(key, None)
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # marks it retrieved: no "never retrieved" warning when nobody waited
            else:
                future.cancel()
            raise
        future.set_result(result)
        return result, False
