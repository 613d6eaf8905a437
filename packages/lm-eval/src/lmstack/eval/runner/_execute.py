"""Answering calls with a model: grouped by kind, longest context first, in batches committed to the cache.

``loglikelihood`` calls go to ``llm.loglikelihood`` (chat contexts rendered with the model's chat
template first), ``loglikelihood_rolling`` to ``llm.loglikelihood_rolling`` with an explicit
``max_length``, ``generate_until`` to ``llm.generate`` (``llm.chat`` for chat contexts) with the task's
decoding as :class:`~lmstack.infer.SamplingParams`. Each batch's answers are committed before the next
batch starts, so an interrupted run keeps everything it finished.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lmstack.core import LMStackError
from lmstack.eval._errors import EvalError
from lmstack.eval.runner._cache import AnswerCache
from lmstack.eval.runner._calls import Call

__all__ = ["DEFAULT_BATCH_SIZE", "CacheStats", "answer_calls"]

# Calls handed to the model (and committed to the cache) at a time. The engine batches continuously
# inside a call, so this bounds lost work on a crash more than it sets the compute batch.
DEFAULT_BATCH_SIZE = 64


@dataclass
class CacheStats:
    """How a run's calls were served.

    Attributes:
        hits: Calls answered from the cache.
        misses: Calls the model computed in this run.
    """

    hits: int = 0
    misses: int = 0


def _quiet(method: Callable[..., Any]) -> dict[str, Any]:
    """``use_tqdm=False`` for the model's methods that take it (the runner draws its own bar)."""
    try:
        return {"use_tqdm": False} if "use_tqdm" in inspect.signature(method).parameters else {}
    except (TypeError, ValueError):
        return {}


def _sampling_params(call: Call) -> Any:
    generation = call.request.generation
    assert generation is not None  # generate_until requests carry their decoding
    params = generation.to_sampling_params()
    params.n = call.samples
    if generation.do_sample:
        # A seed from the key: a resumed or sharded run samples the same completions.
        params.seed = int(call.key[:8], 16)
    return params


def _render_chat(llm: Any, call: Call) -> str:
    rendered = llm.tokenizer.apply_chat_template(call.request.messages(), add_generation_prompt=True)
    return str(rendered)


def _order(call: Call) -> tuple[int, str, int, str]:
    """Sort key: longest context first (memory problems show at once), equal contexts side by side.

    Calls that share a context then land in one batch, where the model computes the context once for
    all their continuations.
    """
    context = call.request.context
    context_chars = call.length - len(call.request.continuation or "")
    return (-context_chars, context if isinstance(context, str) else repr(context), -call.length, call.key)


def _answer_batch(
    llm: Any, kind: str, is_chat: bool, batch: Sequence[Call], max_length: int | None
) -> list[Any]:
    if kind == "loglikelihood":
        pairs = [
            (_render_chat(llm, c) if is_chat else str(c.request.context), c.request.continuation or "")
            for c in batch
        ]
        scores = llm.loglikelihood(pairs, **_quiet(llm.loglikelihood))
        return [{"loglikelihood": float(ll), "is_greedy": bool(greedy)} for ll, greedy in scores]
    if kind == "loglikelihood_rolling":
        texts = [str(c.request.context) for c in batch]
        lls = llm.loglikelihood_rolling(texts, max_length=max_length, **_quiet(llm.loglikelihood_rolling))
        return [{"loglikelihood": float(ll)} for ll in lls]
    params = [_sampling_params(c) for c in batch]
    if is_chat:
        outputs = llm.chat([c.request.messages() for c in batch], params, **_quiet(llm.chat))
    else:
        outputs = llm.generate([str(c.request.context) for c in batch], params, **_quiet(llm.generate))
    answers = []
    for call, out in zip(batch, outputs, strict=True):
        if out.error:
            raise EvalError(
                f"the model failed request {call.key[:16]} (task {call.request.task}): {out.error}"
            )
        answers.append(
            {"texts": [c.text for c in out.outputs], "finish_reasons": [c.finish_reason for c in out.outputs]}
        )
    return answers


def answer_calls(
    llm: Any,
    calls: Sequence[Call],
    cache: AnswerCache,
    fingerprint: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    use_tqdm: bool | None = None,
    describe_model: str = "the model",
) -> CacheStats:
    """Answer every call not yet in the cache, committing each batch as it returns.

    Args:
        llm: The model (any LLM-protocol object).
        calls: Deduplicated calls.
        cache: Where answers are looked up and stored.
        fingerprint: The model's fingerprint (the cache key's first half).
        batch_size: Calls per model invocation and per commit.
        max_length: The rolling window for ``loglikelihood_rolling``.
        use_tqdm: Show a progress bar (default: only on an interactive terminal).
        describe_model: How errors name the model.

    Returns:
        Hits (already cached) and misses (computed now).

    Raises:
        EvalError: The model failed; what earlier batches computed stays in the cache.
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    cached = cache.get(fingerprint, [c.key for c in calls])
    pending = [c for c in calls if c.key not in cached]
    stats = CacheStats(hits=len(calls) - len(pending))
    groups: dict[tuple[str, bool], list[Call]] = {}
    for call in pending:
        groups.setdefault((call.request.kind, call.request.is_chat), []).append(call)
    bar = tqdm(
        total=len(pending), desc="Evaluating", unit="req", disable=None if use_tqdm is None else not use_tqdm
    )
    try:
        for (kind, is_chat), group in sorted(groups.items()):
            group.sort(key=_order)
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                try:
                    answers = _answer_batch(llm, kind, is_chat, batch, max_length)
                except LMStackError as err:
                    if isinstance(err, EvalError):
                        raise
                    where = f"the cache {cache.path}" if cache.path else "memory (no cache file)"
                    raise EvalError(
                        f"{describe_model} failed: {err} ({stats.misses} answers computed in this run are "
                        f"kept in {where}; rerunning resumes from them)"
                    ) from err
                cache.put(fingerprint, ((c.key, c.record(), a) for c, a in zip(batch, answers, strict=True)))
                stats.misses += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()
    return stats
