"""The offline API, ``LLM(path).generate(prompts, SamplingParams(...))``, and the local LLM protocol.

:class:`LLM` wraps one :class:`~lmstack.infer.engine.LLMEngine`. Synchronous calls
(:meth:`LLM.generate`, :meth:`LLM.chat`) drive the engine in the caller's thread; async streams
(:meth:`LLM.stream`) are served by a background thread. Both share the engine under a lock, so a
stream and a batch generation run in the same continuous batch. Every step's outputs are routed to
the caller that owns each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from lmstack.core import CausalLM, PackedAttention, Tokenizer, load_pretrained
from lmstack.infer._errors import InferError, InvalidRequestError
from lmstack.infer._outputs import CompletionOutput, RequestOutput
from lmstack.infer._sampling_params import MAX_LOGPROBS, SamplingParams
from lmstack.infer.engine._engine import EngineConfig, LLMEngine

__all__ = ["LLM", "Message", "Prompt"]

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Message = Mapping[str, Any]

# Positions per slice of the lm head when computing prompt log-probs (bounds the [T, vocab] logits).
_LOGITS_CHUNK = 512


@dataclass
class _Sink:
    """Where one request's outputs go, and how much of each sample was already delivered."""

    deliver: Callable[[RequestOutput], None]
    delta: bool = False
    final_only: bool = False  # deliver only the finished output (batch generation needs no progress)
    sent_text: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)

    def view(self, out: RequestOutput) -> RequestOutput:
        """A snapshot of ``out`` that the engine will not mutate afterwards (only the new part if delta)."""
        if not self.sent_text:
            self.sent_text = [0] * len(out.outputs)
            self.sent_tokens = [0] * len(out.outputs)
        outputs = []
        for c in out.outputs:
            t0, k0 = (self.sent_text[c.index], self.sent_tokens[c.index]) if self.delta else (0, 0)
            outputs.append(
                CompletionOutput(
                    index=c.index,
                    text=c.text[t0:],
                    token_ids=c.token_ids[k0:],
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=None if c.logprobs is None else c.logprobs[k0:],
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
            self.sent_text[c.index], self.sent_tokens[c.index] = len(c.text), len(c.token_ids)
        return RequestOutput(
            out.request_id, out.prompt, list(out.prompt_token_ids), outputs, out.finished, out.error,
            out.num_cached_tokens,
        )  # fmt: skip


class LLM:
    """A local model behind the LLM protocol: generate, chat, stream and score.

    Args:
        model: A Hugging Face checkpoint directory, or a loaded :class:`~lmstack.core.CausalLM`.
        tokenizer: The tokenizer (default: loaded from ``model`` when it is a path).
        dtype: Weight dtype when loading from a path (default: the checkpoint's).
        device: Device when loading from a path.
        **engine_options: Fields of :class:`~lmstack.infer.engine.EngineConfig` (``block_size``,
            ``num_kv_blocks``, ``kv_cache_memory``, ``max_num_seqs``, ``max_num_batched_tokens``,
            ``max_model_len``, ``enable_prefix_caching``, ``enable_chunked_prefill``).

    Example:
        >>> llm = LLM("out/quickstart/tiny-model")  # doctest: +SKIP
        >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))  # doctest: +SKIP
        >>> out[0].outputs[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | CausalLM,
        tokenizer: Tokenizer | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        **engine_options: Any,
    ) -> None:
        if isinstance(model, CausalLM):
            if tokenizer is None:
                raise InvalidRequestError("LLM(model) with a model object needs tokenizer=...")
            net = model
        else:
            net = load_pretrained(model, dtype=dtype, device=device)
            tokenizer = tokenizer or Tokenizer.from_pretrained(model)
        self.engine = LLMEngine(net, tokenizer, EngineConfig(**engine_options))
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        # A released lock is not handed to a waiting thread: the engine thread, re-taking it right
        # after each step, could starve a caller (a new stream, an abort, close) for many steps.
        # Callers hold the turnstile while they wait for the lock, and the engine thread passes
        # through it before each step, so a waiting caller gets the lock after at most one step.
        self._turnstile = threading.Lock()
        self._sinks: dict[str, _Sink] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- protocol: tokenizer -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) the engine serves."""
        return self.engine.max_model_len

    # -- routing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the engine lock, taking it ahead of the engine thread's next step."""
        with self._turnstile, self._lock:
            yield

    def _step_locked(self) -> None:
        for out in self.engine.step():
            sink = self._sinks.get(out.request_id)
            if sink is not None and (out.finished or not sink.final_only):
                sink.deliver(sink.view(out))
                if out.finished:
                    self._sinks.pop(out.request_id, None)

    def _add_locked(self, prompt: Prompt, params: SamplingParams, sink: _Sink) -> str:
        request_id = self.engine.add_request(prompt, params)
        self._sinks[request_id] = sink
        return request_id

    # -- protocol: generate / chat -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for a batch of prompts, returned in the prompts' order.

        Args:
            prompts: One prompt or a list; each is text or a list of token ids.
            sampling_params: One set for all prompts, or one per prompt (default ``SamplingParams()``).
            use_tqdm: Show a progress bar (default: only on an interactive terminal).

        Raises:
            InvalidRequestError: if any prompt or parameter set is invalid (nothing is queued then).
        """
        batch = _as_batch(prompts)
        params = _as_params(sampling_params, len(batch))
        results: dict[str, RequestOutput] = {}
        ids: list[str] = []
        bar = tqdm(
            total=len(batch),
            desc="Generating",
            unit="req",
            disable=None if use_tqdm is None else not use_tqdm,
        )

        def collect(out: RequestOutput) -> None:
            results[out.request_id] = out
            bar.update(1)

        with self._locked():
            try:
                for prompt, p in zip(batch, params, strict=True):
                    ids.append(self._add_locked(prompt, p, _Sink(collect, final_only=True)))
            except BaseException:
                for rid in ids:
                    self._sinks.pop(rid, None)
                    self.engine.abort_request(rid)
                raise
        try:
            while len(results) < len(ids):
                with self._locked():
                    self._step_locked()
        finally:
            with self._locked():
                for rid in ids:
                    if rid not in results:  # interrupted: free what is left
                        self._sinks.pop(rid, None)
                        self.engine.abort_request(rid)
            bar.close()
        return [results[rid] for rid in ids]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        prompts = [
            self.render_chat(conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                             **template_kwargs)
            for conv in _as_conversations(messages)
        ]  # fmt: skip
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(
        self,
        conversation: Sequence[Message],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of a conversation rendered by the chat template (special tokens come from it)."""
        text = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
            **template_kwargs,
        )  # fmt: skip
        assert isinstance(text, str)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- protocol: stream --------------------------------------------------------------------------------
    async def stream(
        self, prompt: Prompt | Sequence[Message], sampling_params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's progress as deltas: each output carries only the new text and tokens.

        ``prompt`` may also be a conversation (a list of messages), rendered with the chat template.
        Closing or cancelling the generator aborts the request and frees its KV blocks at once.
        """
        if self._closed:
            raise InferError("this LLM is closed; create a new one to stream.")
        if _is_conversation(prompt):
            prompt = self.render_chat(cast(Sequence[Message], prompt))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        with self._locked():
            request_id = self._add_locked(
                cast(Prompt, prompt), sampling_params or SamplingParams(), _Sink(deliver, delta=True)
            )
            self._ensure_thread()
            self._work.notify()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                with self._locked():
                    self._sinks.pop(request_id, None)
                    self.engine.abort_request(request_id)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="lmstack-engine", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._turnstile:  # let a caller waiting for the lock go first
                pass
            with self._work:
                while not self._closed and not self.engine.has_unfinished_requests():
                    self._work.wait()
                if self._closed:
                    return
                try:
                    self._step_locked()
                except Exception:  # a broken step must not hang every waiting stream
                    logger.exception("engine step failed; aborting all requests")
                    self._abort_all_locked("the engine step failed; see the server log")

    def _abort_all_locked(self, reason: str) -> None:
        """Finish every routed request with an error, so no waiting caller hangs."""
        for request_id in list(self._sinks):
            out = self.engine.abort_request(request_id)
            sink = self._sinks.pop(request_id)
            if out is not None:
                out.error = out.error or reason
                out.finished = True
                sink.deliver(sink.view(out))

    def close(self) -> None:
        """Stop the background thread; pending streams end with an error and their blocks are freed."""
        with self._turnstile, self._work:
            self._closed = True
            self._abort_all_locked("the LLM was closed")
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- protocol: scoring -------------------------------------------------------------------------------
    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]] | Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        max_batch_tokens: int = 4096,
        use_tqdm: bool | None = None,
    ) -> list[tuple[float, bool]]:
        """Score continuations given contexts: summed log-probability, and whether greedy decoding agrees.

        For each ``(context, continuation)``: the summed log-probability of the continuation's tokens
        given the context, and whether greedy decoding would have produced them.

        Text pairs are tokenized together, so a token spanning the boundary is attributed to the
        continuation (as lm-evaluation-harness does); token-id pairs are used as given. Contexts too
        long for the model are truncated from the left.

        Args:
            requests: ``(context, continuation)`` pairs, both text or both token ids.
            max_batch_tokens: Token budget of one packed forward pass.
            use_tqdm: Show a progress bar (default: only on an interactive terminal).
        """
        pairs = [self._split(ctx, cont) for ctx, cont in requests]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(
            total=len(pairs), desc="Scoring", unit="req", disable=None if use_tqdm is None else not use_tqdm
        )
        batch: list[int] = []
        tokens = 0
        for i in order:
            n = len(pairs[i][0]) + len(pairs[i][1]) - 1
            if batch and tokens + n > max_batch_tokens:
                self._score(batch, pairs, results)
                bar.update(len(batch))
                batch, tokens = [], 0
            batch.append(i)
            tokens += n
        if batch:
            self._score(batch, pairs, results)
            bar.update(len(batch))
        bar.close()
        return [r for r in results if r is not None]

    def prompt_logprobs(self, token_ids: Sequence[int], top_k: int = 0) -> list[dict[int, float] | None]:
        """Log-probability of each prompt token given the tokens before it, from one forward pass.

        This is what an OpenAI ``echo`` + ``logprobs`` completion reports for the prompt, and what
        :meth:`loglikelihood` sums: the raw model distribution (no penalties, no temperature). It runs
        under the LLM's lock, so it does not compete with the engine thread for the model, and it does
        not touch the KV cache.

        Args:
            token_ids: The prompt's token ids (at most ``max_model_len`` of them).
            top_k: How many of the most likely alternatives to report per position, 0 to 20.

        Returns:
            One entry per prompt token: None for the first (nothing predicts it), then
            ``{token_id: logprob}`` holding the token's own log-prob and the ``top_k`` most likely
            tokens (the layout of :attr:`CompletionOutput.logprobs`).

        Raises:
            InvalidRequestError: if the prompt is empty, too long or holds ids outside the vocabulary,
                or ``top_k`` is out of range.
        """
        ids = [int(t) for t in token_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_k must be an int in [0, {MAX_LOGPROBS}], got {top_k!r}")
        vocab = self.engine.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        if len(ids) > self.engine.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.engine.max_model_len}."
            )
        result: list[dict[int, float] | None] = [None]
        if len(ids) == 1:
            return result
        with self._locked():
            chosen, top = self._prompt_logprobs_locked(ids, top_k)
        for i, lp in enumerate(chosen):
            entry = {ids[i + 1]: lp}
            if top is not None:
                for tid, alt in zip(top[1][i], top[0][i], strict=True):
                    entry.setdefault(tid, alt)
            result.append(entry)
        return result

    @torch.inference_mode()
    def _prompt_logprobs_locked(
        self, ids: list[int], top_k: int
    ) -> tuple[list[float], tuple[list[list[float]], list[list[int]]] | None]:
        device = self.engine.device
        model = self.engine.model
        seq = ids[:-1]  # the last token predicts nothing we report
        hidden = model.hidden_states(
            torch.tensor([seq], device=device),
            torch.arange(len(seq), device=device)[None],
            PackedAttention(torch.tensor([0, len(seq)])),
        )[0]
        targets = torch.tensor(ids[1:], device=device)
        chosen: list[float] = []
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        # The lm head in slices: a long prompt's full [T, vocab] logits would not fit in memory.
        for start in range(0, len(seq), _LOGITS_CHUNK):
            logits = model.lm_head(hidden[start : start + _LOGITS_CHUNK]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen.extend(logprobs.gather(-1, targets[start : start + _LOGITS_CHUNK, None])[:, 0].tolist())
            if top_k:
                values, indices = logprobs.topk(top_k, dim=-1)
                top_values.extend(values.tolist())
                top_ids.extend(indices.tolist())
        return chosen, (top_values, top_ids) if top_k else None

    def _split(
        self, context: str | Sequence[int], continuation: str | Sequence[int]
    ) -> tuple[list[int], list[int]]:
        if isinstance(context, str) != isinstance(continuation, str):
            raise InvalidRequestError("a loglikelihood pair must be two strings or two token-id lists.")
        if isinstance(context, str) and isinstance(continuation, str):
            if not continuation:
                raise InvalidRequestError("the continuation to score is empty.")
            # The context's trailing whitespace belongs to the continuation (as in lm-evaluation-harness):
            # byte-level BPE merges a space into the next word, so "ctx " + "word" tokenizes as "ctx" " word".
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tokenizer.encode(context + continuation)
            ctx = self.tokenizer.encode(context)
            if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                ctx_ids, cont_ids = ctx, whole[len(ctx) :]
            else:
                ctx_ids, cont_ids = ctx, self.tokenizer.encode(continuation, add_special_tokens=False)
        else:
            ctx_ids, cont_ids = [int(t) for t in context], [int(t) for t in continuation]
        if not cont_ids:
            raise InvalidRequestError("the continuation to score is empty.")
        if not ctx_ids:
            bos = (
                self.tokenizer.bos_token_id
                if self.tokenizer.bos_token_id is not None
                else self.tokenizer.eos_token_id
            )
            if bos is None:
                raise InvalidRequestError(
                    "the context is empty and the tokenizer has no bos/eos token to start from."
                )
            ctx_ids = [bos]
        limit = self.engine.max_model_len
        if len(cont_ids) >= limit:
            raise InvalidRequestError(
                f"the continuation has {len(cont_ids)} tokens; the context limit is {limit}."
            )
        if len(ctx_ids) + len(cont_ids) > limit:
            ctx_ids = ctx_ids[len(ctx_ids) + len(cont_ids) - limit :]
        return ctx_ids, cont_ids

    @torch.inference_mode()
    def _score(
        self,
        batch: list[int],
        pairs: list[tuple[list[int], list[int]]],
        results: list[tuple[float, bool] | None],
    ) -> None:
        # All sequences of the batch packed in one row: no padding, no attention across sequences.
        ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        picks: list[int] = []
        targets: list[int] = []
        for i in batch:
            ctx, cont = pairs[i]
            seq = (ctx + cont)[:-1]  # the last token predicts nothing we need
            start = len(ids)
            ids.extend(seq)
            positions.extend(range(len(seq)))
            cu.append(len(ids))
            picks.extend(range(start + len(ctx) - 1, start + len(seq)))
            targets.extend(cont)
        device = self.engine.device
        model = self.engine.model
        logits = model(
            torch.tensor([ids], device=device),
            torch.tensor([positions], device=device),
            PackedAttention(torch.tensor(cu)),
            logits_indices=torch.tensor(picks, device=device),
        ).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(targets, device=device)
        chosen = logprobs.gather(-1, target[:, None])[:, 0]
        greedy = logits.argmax(-1) == target
        offset = 0
        for i in batch:
            n = len(pairs[i][1])
            results[i] = (float(chosen[offset : offset + n].sum()), bool(greedy[offset : offset + n].all()))
            offset += n


def _is_conversation(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and isinstance(value[0], Mapping)
    )


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    if isinstance(prompts, torch.Tensor):
        raise InvalidRequestError("pass prompts as text or lists of token ids, not tensors.")
    batch = list(cast(Sequence[Prompt], prompts))
    if not batch:
        raise InvalidRequestError("no prompts given.")
    for p in batch:
        if not isinstance(p, str) and not (isinstance(p, Sequence) and all(isinstance(t, int) for t in p)):
            raise InvalidRequestError(
                f"a prompt must be text or a list of token ids, got {type(p).__name__}."
            )
    return batch


def _as_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    out = list(params)
    if len(out) != n:
        raise InvalidRequestError(f"got {len(out)} sampling parameter sets for {n} prompts.")
    return out


def _as_conversations(messages: Sequence[Message] | Sequence[Sequence[Message]]) -> list[Sequence[Message]]:
    if _is_conversation(messages):
        return [messages]  # type: ignore[list-item]
    return list(messages)  # type: ignore[arg-type]
