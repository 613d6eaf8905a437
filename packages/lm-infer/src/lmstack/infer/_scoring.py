"""Scoring with the local model: continuation log-likelihoods and prompt log-probs.

Scoring needs no KV cache and no sampling: whole sequences go through the engine's model in packed
forwards (many sequences in one row, attention kept inside each), pairs that share a context as one
sequence (the context once, each continuation attending to it and to itself), and only the positions
whose log-probs are reported go through the lm head. :class:`~lmstack.infer.LLM` exposes these as
``loglikelihood`` and ``prompt_logprobs``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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
        # A context that already starts with the bos text (a rendered chat template) gets no second
        # bos, as lm-evaluation-harness's tok_encode decides.
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        special = prefix is None or not context.startswith(tokenizer.decode([prefix]))
        whole = tokenizer.encode(context + continuation, add_special_tokens=special)
        ctx_ids = tokenizer.encode(context, add_special_tokens=special)
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


def _context_groups(
    pairs: Sequence[tuple[list[int], list[int]]], max_batch_tokens: int, alone_past: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Plan the scoring: distinct pairs in groups that share a context, and where each score comes from.

    A group is scored as its context once followed by each continuation (see :func:`_score_packed`),
    so its cost is the context plus every continuation but its last token; groups are cut to the
    token budget where they can be. A continuation longer than its context scores alone: sharing
    would save little and widen the masked attention. A pair equal to an earlier one is not scored
    again, so duplicates get identical scores. With ``alone_past`` (dynamic NTK RoPE's trained
    context), a pair longer than that also scores alone: its RoPE base depends on its own length, so
    its context cannot be shared with a pair of another length.

    Returns:
        The groups (indices into ``pairs``) and, per pair, the index of the pair it takes its score from.
    """
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    source: list[int] = []
    by_context: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        j = first.setdefault((tuple(ctx), tuple(cont)), i)
        source.append(j)
        if j == i:
            alone = len(cont) > len(ctx) or (alone_past is not None and len(ctx) + len(cont) - 1 > alone_past)
            by_context.setdefault((tuple(ctx), i if alone else -1), []).append(i)
    groups: list[list[int]] = []
    for members in by_context.values():
        group: list[int] = []
        tokens = len(pairs[members[0]][0])
        for i in members:
            n = len(pairs[i][1]) - 1
            if group and tokens + n > max_batch_tokens:
                groups.append(group)
                group, tokens = [], len(pairs[i][0])
            group.append(i)
            tokens += n
        groups.append(group)
    return groups, source


def _dynamic_rope_limit(engine: LLMEngine) -> int | None:
    """The trained context when the model's RoPE is dynamic NTK (its base then depends on length)."""
    config = engine.model.config
    rs = config.rope_scaling
    return config.max_position_embeddings if rs is not None and rs.rope_type == "dynamic" else None


def _group_tokens(pairs: Sequence[tuple[list[int], list[int]]], group: list[int]) -> int:
    return len(pairs[group[0]][0]) + sum(len(pairs[i][1]) - 1 for i in group)


def score_pairs(
    engine: LLMEngine,
    pairs: Sequence[tuple[list[int], list[int]]],
    max_batch_tokens: int,
    progress: Callable[[int], object] = lambda _: None,
) -> list[tuple[float, bool]]:
    """Summed log-prob and is-greedy of each pair's continuation, longest groups first in packed batches.

    Pairs with the same context ids (the choices of one multiple-choice question) are scored together:
    the context goes through the model once and each continuation attends to it and to itself only.

    Args:
        engine: The engine whose model scores.
        pairs: ``(context ids, continuation ids)`` from :func:`split_pair`.
        max_batch_tokens: Token budget of one packed forward (a longer group still runs, alone).
        progress: Called with the number of pairs each batch finished.
    """
    groups, source = _context_groups(pairs, max_batch_tokens, _dynamic_rope_limit(engine))
    copies = Counter(source)
    sizes = [_group_tokens(pairs, g) for g in groups]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    batch: list[list[int]] = []
    tokens = 0
    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        if batch and tokens + sizes[g] > max_batch_tokens:
            _score_packed(engine, pairs, batch, results)
            progress(sum(copies[i] for group in batch for i in group))
            batch, tokens = [], 0
        batch.append(groups[g])
        tokens += sizes[g]
    if batch:
        _score_packed(engine, pairs, batch, results)
        progress(sum(copies[i] for group in batch for i in group))
    return [results[j] for j in source]


class _SharedContextAttention:
    """Packed samples, each one context followed by several continuations that never see each other.

    A sample's tokens are its context, then each continuation's (branch 1, 2, ...): a context token
    attends causally within the context; a branch token attends to the whole context and causally
    within its own branch. Samples with a single branch are plain causal attention.

    Args:
        bounds: Sample boundaries in the flattened token batch (``[0, end0, end1, ...]``).
        branches: Per sample, the branch of each token (0 for the context), or None for one branch.
        positions: The flattened batch's positions (rotary positions, used for sliding windows).
    """

    def __init__(self, bounds: list[int], branches: list[list[int] | None], positions: torch.Tensor) -> None:
        self._bounds = bounds
        self._positions = positions
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._branches = [None if b is None else torch.tensor(b, device=positions.device) for b in branches]

    def _mask(self, sample: int, window: int | None) -> torch.Tensor | None:
        """``[L, L]`` True where a query may see a key; None for plain causal attention."""
        cached = (sample, window)
        if cached not in self._masks:
            start, end = self._bounds[sample], self._bounds[sample + 1]
            branch = self._branches[sample]
            mask = None
            if branch is not None or (window is not None and window < end - start):
                pos = self._positions[start:end]
                mask = torch.ones(end - start, end - start, dtype=torch.bool, device=pos.device).tril()
                if branch is not None:
                    mask &= (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
                if window is not None:
                    mask &= pos[:, None] - pos[None, :] < window
            self._masks[cached] = mask
        return self._masks[cached]

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """See :meth:`lmstack.core.AttentionBackend.attend` (``[1, N, H, D]`` packed tokens)."""
        # [1, N, H, D] -> [H, N, D]: one sample at a time is a slice along N.
        qh, kh, vh = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        pieces = []
        for sample, (start, end) in enumerate(zip(self._bounds[:-1], self._bounds[1:], strict=True)):
            mask = self._mask(sample, window)
            pieces.append(
                F.scaled_dot_product_attention(
                    qh[None, :, start:end], kh[None, :, start:end], vh[None, :, start:end], attn_mask=mask,
                    is_causal=mask is None, scale=scale, enable_gqa=kh.shape[0] != qh.shape[0],
                )[0]
            )  # fmt: skip
        return torch.cat(pieces, dim=1).transpose(0, 1)[None]


@torch.inference_mode()
def _score_packed(
    engine: LLMEngine,
    pairs: Sequence[tuple[list[int], list[int]]],
    groups: list[list[int]],
    results: list[tuple[float, bool]],
) -> None:
    # Each group is one sample of the packed row: its context once, then every continuation but its
    # last token (which predicts nothing we need); each continuation's first token is predicted by the
    # context's last position, the rest by the continuation's own positions.
    ids: list[int] = []
    positions: list[int] = []
    cu = [0]
    branches: list[list[int] | None] = []
    picks: list[int] = []
    targets: list[int] = []
    for group in groups:
        ctx = pairs[group[0]][0]
        last = len(ids) + len(ctx) - 1
        ids.extend(ctx)
        positions.extend(range(len(ctx)))
        branch = [0] * len(ctx)
        for b, i in enumerate(group, start=1):
            cont = pairs[i][1]
            picks.append(last)
            picks.extend(range(len(ids), len(ids) + len(cont) - 1))
            ids.extend(cont[:-1])
            positions.extend(range(len(ctx), len(ctx) + len(cont) - 1))
            branch.extend([b] * (len(cont) - 1))
            targets.extend(cont)
        cu.append(len(ids))
        branches.append(branch if len(group) > 1 else None)
    device = engine.device
    position_ids = torch.tensor([positions], device=device)
    # Dynamic NTK: each pair's RoPE base from its own length, as one forward over it alone computes it
    # (lm-evaluation-harness's context + continuation[:-1]); a long pair always scores alone.
    # A shared context's pairs are all within the trained context (see _context_groups): plain RoPE.
    rope_seq_lens = None
    limit = _dynamic_rope_limit(engine)
    if limit is not None:
        sizes = [_group_tokens(pairs, g) for g in groups]
        lens = [n if len(g) == 1 else min(n, limit) for g, n in zip(groups, sizes, strict=True)]
        if max(lens) > limit:
            per_token = [n for n, size in zip(lens, sizes, strict=True) for _ in range(size)]
            rope_seq_lens = torch.tensor([per_token], device=device)
    attention = (
        PackedAttention(torch.tensor(cu))
        if all(b is None for b in branches)  # no shared contexts: the packed backend (flash-attn on GPU)
        else _SharedContextAttention(cu, branches, position_ids[0])
    )
    logits = engine.model(
        torch.tensor([ids], device=device),
        position_ids,
        attention,
        rope_seq_lens=rope_seq_lens,
        logits_indices=torch.tensor(picks, device=device),
    ).float()
    target = torch.tensor(targets, device=device)
    # Summed in float64 and rounded once to float32: a float32 running sum rounds at each step, which
    # made a pair's score depend (~1e-5) on whether its context was shared, i.e. on the batching.
    chosen = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].double()
    greedy = logits.argmax(-1) == target
    offset = 0
    for i in (i for group in groups for i in group):
        n = len(pairs[i][1])
        logprob = float(chosen[offset : offset + n].sum().float())
        results[i] = (logprob, bool(greedy[offset : offset + n].all()))
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
