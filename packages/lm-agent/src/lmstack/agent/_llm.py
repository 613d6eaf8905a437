"""How agents talk to a model: the LLM protocol, called without blocking the event loop.

Agents run many steps concurrently on one asyncio loop. A protocol implementation may offer async
methods (:class:`~lmstack.infer.RemoteLLM`'s ``achat``) or only blocking ones
(:class:`~lmstack.infer.LLM`'s ``chat``, which is thread-safe): :func:`achat` uses the first when it
exists and runs the second in a worker thread otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from lmstack.infer import LLMProtocol, RequestOutput, SamplingParams

__all__ = ["achat", "supports"]


def supports(llm: LLMProtocol, option: str) -> bool:
    """Whether ``llm.chat`` takes the keyword ``option`` (``tools``, ``response_format`` ...).

    Implementations of the protocol written before tools existed take neither; agents then fall back
    to a text protocol they parse themselves.
    """
    try:
        parameters = inspect.signature(llm.chat).parameters
    except (TypeError, ValueError):
        return False
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


async def achat(
    llm: LLMProtocol,
    messages: Sequence[Mapping[str, Any]],
    params: SamplingParams | None = None,
    *,
    executor: concurrent.futures.Executor | None = None,
    **options: Any,
) -> RequestOutput:
    """One reply to one conversation, awaited without blocking the loop.

    Args:
        llm: Any LLM protocol implementation.
        messages: The conversation.
        params: Sampling parameters.
        executor: Where a blocking ``chat`` runs (default: the loop's default thread pool, which
            may hold fewer threads than a caller runs calls at once).
        **options: ``tools``, ``tool_choice``, ``response_format`` (only those given are passed).

    Returns:
        The request's output (``outputs[0]`` is the reply).
    """
    kwargs = {key: value for key, value in options.items() if value is not None}
    method = getattr(llm, "achat", None)
    if method is not None and inspect.iscoroutinefunction(method):
        outs = await method(list(messages), params, **kwargs)
    else:
        call = functools.partial(llm.chat, list(messages), params, **kwargs)
        outs = await asyncio.get_running_loop().run_in_executor(executor, call)
    return outs[0]
