"""Scoring with the local model: continuation log-likelihoods and prompt log-probs.

Scoring needs no KV cache and no sampling: whole sequences go through the engine's model in packed
forwards (many sequences in one row, attention kept inside each), and only the positions whose
log-probs are reported go through the lm head. :class:`~lmstack.infer.LLM` exposes these as
``loglikelihood`` and ``prompt_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmstack.core import PackedAttention
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._inputs import check_token_ids, split_whitespace
from lmstack.infer._sampling_params import MAX_LOGPROBS
from lmstack.infer.engine import LLMEngine

__all__ = ["PromptLogprobs", "check_prompt", "prompt_logprobs", "score_pairs", "split_pair"]

# One prompt position's {token_id: logprob}: the token's own and its top alternatives (None first).
PromptLogprobs = list[dict[int, float] | None]

# Positions per slice of the lm head when computing prompt log-probs (bounds the [T, vocab] logits).
_LOGITS_CHUNK = 512


def split_pair(
    engine: LLMEngine, context: str | Sequence[int], continuation: str | Sequence[int]
) -> tuple[list[int], list[int]]:
    """The token ids of one ``(context, continuation)`` pair, ready to score.

    Text pairs are tokenized together, so a token spanning the boundary belongs to the continuation
    (the context's trailing whitespace is moved to the continuation first, as lm-evaluation-harness
    does); token-id pairs are used as given. An empty context starts from the bos (else eos) token;
    a context too long for the model is cut from the left.

    Raises:
        InvalidRequestError: mixed text and ids, an empty continuation, ids outside the vocabulary,
            or a continuation that alone fills the model's context.
    """
    tokenizer = engine.tokenizer
    if isinstance(context, str) and isinstance(continuation, str):
        if not continuation:
            raise InvalidRequestError("the continuation to score is empty.")
        context, continuation = split_whitespace(context, continuation)
        whole = tokenizer.encode(context + continuation)
        ctx_ids = tokenizer.encode(context)
        if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
            cont_ids = whole[len(ctx_ids) :]
        else:
            cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
    elif not isinstance(context, str) and not isinstance(continuation, str):
        vocab = engine.vocab_size
        cont_ids = check_token_ids(continuation, vocab, what="the continuation to score")
        ctx_ids = check_token_ids(context, vocab, what="the context") if len(context) else []
    else:
        raise InvalidRequestError("a loglikelihood pair must be two strings or two token-id lists.")
    if not cont_ids:
        raise InvalidRequestError("the continuation to score is empty.")
    if not ctx_ids:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise InvalidRequestError(
                "the context is empty and the tokenizer has no bos/eos token to start from."
            )
        ctx_ids = [bos]
    limit = engine.max_model_len
    if len(cont_ids) >= limit:
        raise InvalidRequestError(
            f"the continuation has {len(cont_ids)} tokens; the context limit is {limit}."
        )
    if len(ctx_ids) + len(cont_ids) > limit:
        ctx_ids = ctx_ids[len(ctx_ids) + len(cont_ids) - limit :]
    return ctx_ids, cont_ids


def score_pairs(
    engine: LLMEngine,
    pairs: Sequence[tuple[list[int], list[int]]],
    max_batch_tokens: int,
    progress: Callable[[int], object] = lambda _: None,
) -> list[tuple[float, bool]]:
    """Summed log-prob and is-greedy of each pair's continuation, longest pairs first in packed batches.

    Args:
        engine: The engine whose model scores.
        pairs: ``(context ids, continuation ids)`` from :func:`split_pair`.
        max_batch_tokens: Token budget of one packed forward (a longer pair still runs, alone).
        progress: Called with the number of pairs each batch finished.
    """
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    batch: list[int] = []
    tokens = 0
    for i in order:
        n = len(pairs[i][0]) + len(pairs[i][1]) - 1
        if batch and tokens + n > max_batch_tokens:
            _score_packed(engine, [pairs[j] for j in batch], batch, results)
            progress(len(batch))
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        _score_packed(engine, [pairs[j] for j in batch], batch, results)
        progress(len(batch))
    return results


@torch.inference_mode()
def _score_packed(
    engine: LLMEngine,
    pairs: list[tuple[list[int], list[int]]],
    slots: list[int],
    results: list[tuple[float, bool]],
) -> None:
    # All sequences of the batch packed in one row: no padding, no attention across sequences.
    ids: list[int] = []
    positions: list[int] = []
    cu = [0]
    picks: list[int] = []
    targets: list[int] = []
    for ctx, cont in pairs:
        seq = (ctx + cont)[:-1]  # the last token predicts nothing we need
        start = len(ids)
        ids.extend(seq)
        positions.extend(range(len(seq)))
        cu.append(len(ids))
        picks.extend(range(start + len(ctx) - 1, start + len(seq)))
        targets.extend(cont)
    device = engine.device
    logits = engine.model(
        torch.tensor([ids], device=device),
        torch.tensor([positions], device=device),
        PackedAttention(torch.tensor(cu)),
        logits_indices=torch.tensor(picks, device=device),
    ).float()
    target = torch.tensor(targets, device=device)
    chosen = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0]
    greedy = logits.argmax(-1) == target
    offset = 0
    for slot, (_, cont) in zip(slots, pairs, strict=True):
        n = len(cont)
        results[slot] = (float(chosen[offset : offset + n].sum()), bool(greedy[offset : offset + n].all()))
        offset += n


def check_prompt(engine: LLMEngine, token_ids: Sequence[int], top_k: int) -> list[int]:
    """The prompt of :func:`prompt_logprobs` as a list of ids, checked against the model.

    Raises:
        InvalidRequestError: an empty prompt, ids outside the vocabulary, a prompt longer than the
            model's context, or ``top_k`` outside ``[0, 20]``.
    """
    ids = check_token_ids(token_ids, engine.vocab_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_LOGPROBS:
        raise InvalidRequestError(f"top_k must be an int in [0, {MAX_LOGPROBS}], got {top_k!r}")
    if len(ids) > engine.max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens but the model's context is {engine.max_model_len}.",
            param="prompt",
        )
    return ids


@torch.inference_mode()
def prompt_logprobs(engine: LLMEngine, ids: list[int], top_k: int) -> PromptLogprobs:
    """Log-prob of each prompt token given the tokens before it (ids checked by :func:`check_prompt`).

    Returns:
        None for the first token (nothing predicts it), then ``{token_id: logprob}`` with the token's
        own log-prob and its ``top_k`` most likely alternatives.
    """
    result: PromptLogprobs = [None]
    if len(ids) < 2:
        return result
    device = engine.device
    model = engine.model
    seq = ids[:-1]  # the last token predicts nothing we report
    hidden = model.hidden_states(
        torch.tensor([seq], device=device),
        torch.arange(len(seq), device=device)[None],
        PackedAttention(torch.tensor([0, len(seq)])),
    )[0]
    targets = torch.tensor(ids[1:], device=device)
    # The lm head in slices: a long prompt's full [T, vocab] logits would not fit in memory.
    for start in range(0, len(seq), _LOGITS_CHUNK):
        logprobs = torch.log_softmax(model.lm_head(hidden[start : start + _LOGITS_CHUNK]).float(), dim=-1)
        chosen = logprobs.gather(-1, targets[start : start + _LOGITS_CHUNK, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(top_k, dim=-1) if top_k else (None, None)
        for row, lp in enumerate(chosen):
            entry = {ids[start + row + 1]: lp}
            if top_values is not None and top_ids is not None:
                for tid, alt in zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True):
                    entry.setdefault(tid, alt)
            result.append(entry)
    return result
