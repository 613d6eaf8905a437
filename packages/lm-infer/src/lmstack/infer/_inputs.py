"""What callers pass to an LLM, made uniform: prompts, conversations, sampling parameters, token ids.

Both implementations of the LLM protocol (the local :class:`~lmstack.infer.LLM` and
:class:`~lmstack.infer.RemoteLLM`) accept the same shapes, so they read them with the same helpers.
A flat list of ints is one token-id prompt; only a list of strings or of lists is a batch.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import SamplingParams

__all__ = [
    "Message",
    "Prompt",
    "as_batch",
    "as_conversations",
    "as_params",
    "check_token_ids",
    "is_conversation",
    "split_whitespace",
]

Prompt = str | Sequence[int]
Message = Mapping[str, Any]


def is_conversation(value: object) -> bool:
    """Whether ``value`` is one conversation: a non-empty sequence of message mappings."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and isinstance(value[0], Mapping)
    )


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(t, int) for t in value)
    )


def as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or a list of them, as a list of prompts.

    Args:
        prompts: Text, token ids, or a list of either.

    Returns:
        The prompts; a single text or a single (non-empty) list of ints becomes a batch of one.

    Raises:
        InvalidRequestError: No prompt, a tensor, or an item that is neither text nor token ids.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and _is_token_ids(prompts):
        return [list(cast(Sequence[int], prompts))]
    if isinstance(prompts, torch.Tensor):
        raise InvalidRequestError("pass prompts as text or lists of token ids, not tensors.", param="prompt")
    batch = list(cast(Sequence[Prompt], prompts))
    if not batch:
        raise InvalidRequestError("no prompts given.", param="prompt")
    for p in batch:
        if not isinstance(p, str) and not _is_token_ids(p):
            raise InvalidRequestError(
                f"a prompt must be text or a list of token ids, got {type(p).__name__}.", param="prompt"
            )
    return batch


def as_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt: the defaults, one set shared, or one set each.

    Raises:
        InvalidRequestError: A list whose length is not ``n``.
    """
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    out = list(params)
    if len(out) != n:
        raise InvalidRequestError(f"got {len(out)} sampling parameter sets for {n} prompts.")
    return out


def as_conversations(messages: Sequence[Message] | Sequence[Sequence[Message]]) -> list[Sequence[Message]]:
    """One conversation or a list of them, as a list of conversations."""
    if is_conversation(messages):
        return [cast(Sequence[Message], messages)]
    return list(cast(Sequence[Sequence[Message]], messages))


def check_token_ids(
    token_ids: Sequence[int], vocab_size: int, *, what: str = "the prompt", param: str = "prompt"
) -> list[int]:
    """Token ids as a list of ints, each in ``[0, vocab_size)``, at least one.

    Args:
        token_ids: The ids (ints, or objects with ``__index__`` such as numpy integers).
        vocab_size: The model's vocabulary size.
        what: How messages name the ids (``"the prompt"``, ``"the continuation"``).
        param: The request field reported with the error.

    Returns:
        The ids as a new list of ints.

    Raises:
        InvalidRequestError: Empty, not integers, or outside the vocabulary.
    """
    try:
        ids = [operator.index(t) for t in token_ids]
    except TypeError:
        raise InvalidRequestError(f"{what} must be text or a list of int token ids.", param=param) from None
    if not ids:
        raise InvalidRequestError(f"{what} is empty; give at least one token.", param=param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"{what} holds token ids {bad[:5]} outside the vocabulary [0, {vocab_size}).", param=param
        )
    return ids


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Moves the context's trailing whitespace to the start of the continuation (lm-evaluation-harness).

    Tokenizers attach a space to the word after it, so ``("The answer is ", "42")`` is scored as
    ``("The answer is", " 42")``: the continuation's first token is then a real token of the text.
    """
    stripped = context.rstrip()
    if len(stripped) == len(context):
        return context, continuation
    return stripped, context[len(stripped) :] + continuation
