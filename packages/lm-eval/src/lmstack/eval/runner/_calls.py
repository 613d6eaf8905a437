"""Model calls: the deduplicated unit of work, its cache key, and the split of a run into shards.

Many requests are the same call (the same context and continuation in two tasks, or a few-shot
prompt that two documents share); a :class:`Call` is one of them, keyed by the request's hash plus
the run options that change its answer (samples per prompt, the rolling window). The key is what the
cache stores and what ``--shard i/n`` splits on, so every process of a sharded run agrees on who
computes what without talking to the others.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.eval._errors import EvalError
from lmstack.eval.tasks import Request

__all__ = ["Call", "Shard", "build_calls", "parse_shard"]

# Part of every cache key. Bump it when lmstack computes the answer to the same request differently
# (a scoring fix, such as the double BOS of chat contexts fixed in version 2), so that caches written
# before the change are not served as if they still held the right answers.
ANSWERS_VERSION = 2


@dataclass(frozen=True)
class Call:
    """One model call, standing for every equal request of the run.

    Attributes:
        request: A request with this payload (the first one met).
        samples: Completions per prompt (``generate_until`` for pass@k); 1 otherwise.
        max_length: The rolling window passed to ``loglikelihood_rolling`` (None: the model's default).
    """

    request: Request
    samples: int = 1
    max_length: int | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        extra = [f"answers=v{ANSWERS_VERSION}"]
        if self.samples != 1:
            extra.append(f"samples={self.samples}")
        if self.request.kind == "loglikelihood_rolling":
            extra.append(f"max_length={self.max_length}")
        key = hashlib.sha256(f"{self.request.request_hash}|{'|'.join(extra)}".encode()).hexdigest()
        object.__setattr__(self, "key", key)

    @property
    def length(self) -> int:
        """Characters sent, to run the longest calls first (memory problems show at once, as in lm-eval)."""
        context = self.request.context
        size = len(context) if isinstance(context, str) else sum(len(m.content) for m in context)
        return size + len(self.request.continuation or "")

    def record(self) -> dict[str, Any]:
        """What the cache stores beside the answer: the payload and the options in the key."""
        return {**self.request.payload(), "samples": self.samples, "max_length": self.max_length}


def build_calls(
    requests: Iterable[Request], *, samples: int = 1, max_length: int | None = None
) -> tuple[list[str], dict[str, Call]]:
    """Key each request, and keep one :class:`Call` per distinct key.

    Returns:
        The key of each request (in order) and the calls by key.
    """
    keys: list[str] = []
    calls: dict[str, Call] = {}
    for request in requests:
        n = samples if request.kind == "generate_until" else 1
        call = Call(request, n, max_length if request.kind == "loglikelihood_rolling" else None)
        keys.append(call.key)
        calls.setdefault(call.key, call)
    return keys, calls


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the calls whose key falls in it.

    Attributes:
        index: This shard, ``0 <= index < count``.
        count: How many shards share the run.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise EvalError(f"shard {self.index}/{self.count}: need 0 <= i < n (shards are numbered from 0)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        """Whether the call with this key is computed by this shard (a function of the key alone)."""
        return int(key[:16], 16) % self.count == self.index

    def select(self, keys: Sequence[str]) -> list[str]:
        """The keys this shard computes."""
        return [key for key in keys if self.owns(key)]


def parse_shard(value: str | tuple[int, int] | Shard | None) -> Shard | None:
    """Read ``"i/n"`` (0-based ``i``), a tuple ``(i, n)`` or a :class:`Shard`."""
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, tuple):
        return Shard(*value)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not match:
        raise EvalError(f"--shard expects i/n such as 0/4 (shards are numbered from 0), got {value!r}")
    return Shard(int(match.group(1)), int(match.group(2)))
