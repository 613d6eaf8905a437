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

from lmstack.core import Tokenizer
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import SamplingParams

__all__ = [
    "Message",
    "Prompt",
    "as_batch",
    "as_conversations",
    "as_params",
    "check_max_length",
    "check_token_ids",
    "is_conversation",
    "plan_rolling",
    "rolling_token_lists",
    "rolling_windows",
    "split_whitespace",
    "sum_rolling",
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


# -- rolling log-likelihood ------------------------------------------------------------------------------
def check_max_length(max_length: object, limit: int | None) -> int | None:
    """The window length of a rolling log-likelihood, checked: an int of at least 2, at most ``limit``.

    Args:
        max_length: What the caller asked for (None: the caller picks its default).
        limit: The longest window the model can score (None when unknown).

    Raises:
        InvalidRequestError: not an int, below 2 (a window needs a token to condition on and one to
            predict), or above ``limit``.
    """
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise InvalidRequestError(f"max_length must be an int, got {max_length!r}.", param="max_length")
    if max_length < 2:
        raise InvalidRequestError(
            f"max_length must be at least 2 (a window conditions on one token and predicts one), got "
            f"{max_length}.",
            param="max_length",
        )
    if limit is not None and max_length > limit:
        raise InvalidRequestError(
            f"max_length is {max_length} but the longest window this model can score is {limit} tokens.",
            param="max_length",
        )
    return max_length


def _prefix_token_id(tokenizer: Tokenizer) -> int | None:
    # lm-evaluation-harness's HF model conditions the first token on bos, else on eos.
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def rolling_token_lists(
    texts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Tokenizer, vocab_size: int | None
) -> list[list[int]]:
    """The tokens to score of each text of a rolling log-likelihood.

    Text is tokenized as lm-evaluation-harness's HF model does: with the tokenizer's special tokens
    (a leading bos where the tokenizer adds one), unless the text already starts with the prefix
    token's text. Token-id inputs are taken as already tokenized. An empty id list has no tokens,
    and neither has an empty text unless the tokenizer adds special tokens to it (as a bos).

    Args:
        texts: Texts, or token-id lists (a list of them, even for one).
        tokenizer: The model's tokenizer.
        vocab_size: Ids must lie in ``[0, vocab_size)`` (None: not checked here).

    Raises:
        InvalidRequestError: a single text or id list instead of a list of them, an item that is
            neither, or ids that are not ints or lie outside the vocabulary.
    """
    if isinstance(texts, (str, torch.Tensor)) or not isinstance(texts, Sequence):
        raise InvalidRequestError(
            "loglikelihood_rolling takes a list of texts or of token-id lists; wrap a single one in a list.",
            param="texts",
        )
    prefix = _prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else None
    lists: list[list[int]] = []
    for item in texts:
        if isinstance(item, str):
            special = not (prefix_text and item.startswith(prefix_text))
            lists.append(tokenizer.encode(item, add_special_tokens=special))
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            if not item:
                lists.append([])
            elif vocab_size is None:
                try:
                    lists.append([operator.index(t) for t in item])
                except TypeError:
                    raise InvalidRequestError(
                        "a text to score must be a str or a list of int token ids.", param="texts"
                    ) from None
            else:
                lists.append(check_token_ids(item, vocab_size, what="the text to score", param="texts"))
        else:
            raise InvalidRequestError(
                f"a text to score must be a str or a list of int token ids, got {type(item).__name__}.",
                param="texts",
            )
    return lists


def rolling_windows(
    token_ids: Sequence[int], prefix_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that score every token of ``token_ids`` once.

    The first window predicts the first ``max_length`` tokens from ``prefix_id`` alone; each later
    one predicts the next (at most ``max_length``) tokens from the tokens right before them, so that
    context and continuation together are ``max_length + 1`` tokens: the model sees ``max_length``.
    These are lm-evaluation-harness's rolling windows with a context of one token, made disjoint.

    Args:
        token_ids: The tokens to score.
        prefix_id: The token the first one is conditioned on.
        max_length: The most tokens a window feeds the model.
    """
    ids = list(token_ids)
    windows: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        context = [prefix_id] if start == 0 else ids[end - max_length - 1 : start]
        windows.append((context, ids[start:end]))
    return windows


def plan_rolling(
    token_lists: Sequence[Sequence[int]], tokenizer: Tokenizer, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Every window of every token list, and the index of the list each window belongs to.

    Raises:
        InvalidRequestError: a list has tokens but the tokenizer has no bos or eos token to start from.
    """
    prefix = _prefix_token_id(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    for index, ids in enumerate(token_lists):
        if not ids:
            continue
        if prefix is None:
            raise InvalidRequestError(
                "the tokenizer has no bos or eos token to condition a text's first token on."
            )
        windows = rolling_windows(ids, prefix, max_length)
        pairs.extend(windows)
        owners.extend([index] * len(windows))
    return pairs, owners


def sum_rolling(count: int, owners: Sequence[int], scores: Sequence[float]) -> list[float]:
    """Each text's log-likelihood: its windows' scores summed in order (0.0 for a text with none)."""
    totals = [0.0] * count
    for owner, score in zip(owners, scores, strict=True):
        totals[owner] += score
    return totals
