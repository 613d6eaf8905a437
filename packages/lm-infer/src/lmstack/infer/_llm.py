"""The offline API, ``LLM(path).generate(prompts, SamplingParams(...))``, and the local LLM protocol.

:class:`LLM` wraps one :class:`~lmstack.infer.engine.LLMEngine`. Async streams (:meth:`LLM.stream`,
:meth:`LLM.submit`) are served by a background engine thread; their requests, their aborts and echo
scoring (:meth:`LLM.prompt_logprobs`) reach it through a queue, so a caller on an event loop never
waits for the engine: it queues and returns, and outputs come back through the loop. The engine
thread takes one turn at a time: it applies what was queued, runs at most one bounded chunk of echo
scoring, then one engine step. Synchronous calls (:meth:`LLM.generate`, :meth:`LLM.chat`) drive the
engine in the caller's thread under the engine lock, in the same continuous batch as the streams.
Every step's outputs are routed to the caller that owns each request. Scoring
(:meth:`LLM.loglikelihood`, :meth:`LLM.loglikelihood_rolling`) runs packed forwards of its own,
written in :mod:`lmstack.infer._scoring`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmstack.core import CausalLM, ConfigError, Tokenizer, load_pretrained
from lmstack.infer._errors import InferError, InvalidRequestError
from lmstack.infer._inputs import (
    Message,
    Prompt,
    as_batch,
    as_conversations,
    as_params,
    check_max_length,
    is_conversation,
    plan_rolling,
    rolling_token_lists,
    sum_rolling,
)
from lmstack.infer._outputs import CompletionOutput, RequestOutput
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer._scoring import PromptLogprobs, check_prompt, score_pairs, split_pair
from lmstack.infer.engine import EngineConfig, LLMEngine
from lmstack.infer.tools import get_tool_parser, plan_chat

__all__ = ["LLM", "RequestStream", "StepStats"]

logger = logging.getLogger(__name__)


# Longest text tokenized on the caller's thread; a longer one is tokenized in a worker thread.
_INLINE_TEXT = 512
# Rows of the lm head applied at once in echo scoring: a long chunk's [T, vocab] logits would not fit.
_LOGITS_CHUNK = 512


@dataclass
class _Sink:
    """Where one request's outputs go, and how much of each sample was already delivered."""

    deliver: Callable[[RequestOutput], None] | None = None  # called on the engine's thread
    # A stream's outputs go to ``queue`` on its event loop instead, batched per step (see LLM._send).
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue[Any] | None = None
    delta: bool = False
    final_only: bool = False  # deliver only the finished output (batch generation needs no progress)
    prompt_text: str | None = None  # the prompt as the caller gave it, when the engine got its ids
    closed: bool = False  # the reader is gone (its abort is queued): deliver nothing more
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
        prompt = out.prompt if self.prompt_text is None else self.prompt_text
        return RequestOutput(
            out.request_id, prompt, list(out.prompt_token_ids), outputs, out.finished, out.error,
            out.num_cached_tokens,
        )  # fmt: skip


@dataclass
class _Add:
    """Queued: add a request to the engine; its sink gets True (taken) or the refusal first."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    sink: _Sink


@dataclass
class _Abort:
    """Queued: abort a request (a no-op if it already finished)."""

    request_id: str


@dataclass
class _Score:
    """Queued: echo log-probs of one prompt, computed in chunks between engine steps."""

    scorer: _PromptScorer
    future: concurrent.futures.Future[PromptLogprobs]
    cancelled: bool = False


_Command = _Add | _Abort | _Score


class StepStats(NamedTuple):
    """What the engine thread measured since the last :meth:`LLM.reset_step_stats`.

    Attributes:
        steps: Engine steps run (by the engine thread or a synchronous caller).
        max_step_s: The longest engine step, in seconds.
        max_turn_s: The longest turn of the engine thread (queued adds and aborts, one chunk of
            echo scoring, one step): the longest a stream can wait between two outputs while the
            engine is busy, besides the event loop's own delay.
    """

    steps: int
    max_step_s: float
    max_turn_s: float


class _PromptScorer:
    """Echo log-probs of one prompt (see :meth:`LLM.prompt_logprobs`), computed a chunk at a time.

    Each chunk is one forward over at most a step's token budget; it attends to the keys and values
    of the chunks before it, kept here (never in the engine's KV cache), so the result equals one
    forward over the whole prompt up to float rounding. It is also the chunks' attention backend.

    Args:
        engine: The engine whose model scores.
        ids: The checked prompt (at least two tokens).
        top_k: Alternatives to report per position.
    """

    def __init__(self, engine: LLMEngine, ids: list[int], top_k: int) -> None:
        self.engine = engine
        self.ids = ids
        self.top_k = top_k
        self.result: PromptLogprobs = [None]
        self._done = 0  # tokens of ids[:-1] already run (the last token predicts nothing we report)
        self._start = 0  # the running chunk's first position
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    @property
    def finished(self) -> bool:
        """Whether every position is scored."""
        return self._done >= len(self.ids) - 1

    @torch.inference_mode()
    def advance(self, budget: int) -> None:
        """Score the next ``budget`` positions (or what is left)."""
        model, device = self.engine.model, self.engine.device
        total = len(self.ids) - 1
        start, end = self._done, min(total, self._done + budget)
        self._start = start
        positions = torch.arange(start, end, device=device)[None]
        # Dynamic NTK rotates by the whole prompt's length, as one forward over all of it would.
        hidden = model.hidden_states(
            torch.tensor([self.ids[start:end]], device=device), positions, self,
            torch.full_like(positions, total),
        )[0]  # fmt: skip
        targets = torch.tensor(self.ids[start + 1 : end + 1], device=device)
        for lo in range(0, end - start, _LOGITS_CHUNK):
            logprobs = torch.log_softmax(model.lm_head(hidden[lo : lo + _LOGITS_CHUNK]).float(), dim=-1)
            chosen = logprobs.gather(-1, targets[lo : lo + _LOGITS_CHUNK, None])[:, 0].tolist()
            top_values, top_ids = logprobs.topk(self.top_k, dim=-1) if self.top_k else (None, None)
            for row, lp in enumerate(chosen):
                entry = {self.ids[start + lo + row + 1]: lp}
                if top_values is not None and top_ids is not None:
                    for tid, alt in zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True):
                        entry.setdefault(tid, alt)
                self.result.append(entry)
        self._done = end
        if self.finished:
            self._keys, self._values = [], []

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
        window: int | None,
    ) -> torch.Tensor:  # fmt: skip
        """See :meth:`lmstack.core.AttentionBackend.attend`: the chunk's queries over every key so far."""
        start, n = self._start, q.shape[1]
        if layer_idx == len(self._keys):  # first chunk: room for the whole prompt's keys
            total = len(self.ids) - 1
            self._keys.append(k.new_empty((1, total, *k.shape[2:])))
            self._values.append(v.new_empty((1, total, *v.shape[2:])))
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[:, start : start + n] = k
        values[:, start : start + n] = v
        end = start + n
        mask = None
        if start > 0 or (window is not None and window < end):
            i = torch.arange(start, end, device=q.device)[:, None]
            j = torch.arange(end, device=q.device)[None]
            mask = j <= i
            if window is not None:
                mask &= i - j < window
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
        )  # fmt: skip
        return out.transpose(1, 2)


class RequestStream:
    """One request queued for the engine thread (see :meth:`LLM.submit`), read as its deltas.

    Iterate it (``async for out in request``) for the request's progress as deltas, the last one
    ``finished``; :meth:`started` waits for the engine's answer to the add alone. :meth:`abort`
    queues the request's abort and returns at once.
    """

    def __init__(self, llm: LLM, request_id: str, queue: asyncio.Queue[Any], sink: _Sink) -> None:
        self.request_id = request_id
        self._llm = llm
        self._queue = queue
        self._sink = sink
        self._started = False
        self._done = False

    async def started(self) -> None:
        """Wait (without blocking the event loop) until the engine has taken the request.

        Raises:
            InvalidRequestError: the engine refused the request (the message says why).
            InferError: the LLM was closed first.
        """
        if self._started:
            return
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._started = True

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self.started()
        out: RequestOutput = await self._queue.get()
        if out.finished:
            self._done = True
        return out

    def abort(self) -> None:
        """Queue the request's abort (its KV blocks are freed before the engine's next step).

        Idempotent, and a no-op once the request has finished. Never waits for the engine.
        """
        if self._done:
            return
        self._done = True
        self._sink.closed = True
        self._llm._post(_Abort(self.request_id))


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    """Runs on a stream's event loop: hand one step's items to their streams."""
    for queue, item in items:
        queue.put_nowait(item)


class LLM:
    """A local model behind the LLM protocol: generate, chat, stream and score.

    Args:
        model: A Hugging Face checkpoint directory, or a loaded :class:`~lmstack.core.CausalLM`.
        tokenizer: The tokenizer (default: loaded from ``model`` when it is a path).
        dtype: Weight dtype when loading from a path (default: the checkpoint's).
        device: Device when loading from a path.
        tool_call_parser: How :meth:`chat` finds the tool calls in a reply with ``tool_choice="auto"``
            (a name of :data:`lmstack.infer.tools.TOOL_PARSERS`: ``"hermes"``, ``"internlm2"``,
            ``"llama3_json"``, ``"mistral"``); default: detected from the chat template, else hermes.
        **engine_options: Fields of :class:`~lmstack.infer.engine.EngineConfig` (``block_size``,
            ``num_kv_blocks``, ``kv_cache_memory``, ``max_num_seqs``, ``max_num_batched_tokens``,
            ``max_model_len``, ``enable_prefix_caching``, ``enable_chunked_prefill``,
            ``kv_cache_dtype``, ``kernels``, ``fuse_weights``, ``tensor_parallel_size``).

    A checkpoint whose ``config.json`` has a ``quantization_config`` (AutoAWQ GEMM, GPTQ, or what
    ``lmstack quantize`` writes) is loaded with its weight-only quantized layers.

    ``tensor_parallel_size=N`` (N > 1, a checkpoint path) runs the engine across N processes: this
    one keeps the scheduler and the sampler and holds a shard of the model, and it starts N - 1
    worker processes holding the other shards (gloo on CPU; NCCL on CUDA, rank ``r`` on ``cuda:r``).
    Greedy outputs are those of one process. :meth:`close` (or leaving a ``with`` block) stops the
    workers; so does the end of the interpreter. Scoring (:meth:`loglikelihood`,
    :meth:`loglikelihood_rolling`, :meth:`prompt_logprobs`) and quantized checkpoints are not
    supported with it yet, and are refused with an error saying so.

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
        tool_call_parser: str | None = None,
        **engine_options: Any,
    ) -> None:
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # an unknown name fails before the model loads
        self.tool_call_parser = tool_call_parser
        config = EngineConfig(**engine_options)  # a bad option fails before the model loads
        group = None
        if config.tensor_parallel_size > 1:
            if isinstance(model, CausalLM):
                raise ConfigError(
                    f"tensor_parallel_size={config.tensor_parallel_size} needs a checkpoint path (every "
                    "process loads its shard from it), not a model object; save it with "
                    "lmstack.core.save_pretrained and pass the directory.",
                    field="tensor_parallel_size",
                )
            from lmstack.infer.engine._tensor_parallel import TensorParallelGroup

            group, net = TensorParallelGroup.launch(
                model, dataclasses.asdict(config), dtype=dtype, device=device
            )
            try:
                tokenizer = tokenizer or Tokenizer.from_pretrained(model)
            except BaseException:
                group.close()
                raise
        elif isinstance(model, CausalLM):
            if tokenizer is None:
                raise InvalidRequestError("LLM(model) with a model object needs tokenizer=...")
            net = model
        else:
            from lmstack.infer.quant import is_quantized_checkpoint, load_quantized  # lazy: quant is optional

            # A checkpoint with a quantization_config (AWQ, GPTQ, lmstack's own) loads quantized.
            load = load_quantized if is_quantized_checkpoint(model) else load_pretrained
            net = load(model, dtype=dtype, device=device)
            tokenizer = tokenizer or Tokenizer.from_pretrained(model)
        try:
            self.engine = LLMEngine(net, tokenizer, config, tensor_parallel=group)
        except BaseException:
            if group is not None:  # the workers must not outlive a failed start
                group.close()
            raise
        # The engine lock: held by whoever touches the engine (the engine thread for a turn, a
        # synchronous generate for one step). Never taken on an event loop.
        self._lock = threading.RLock()
        # A released lock is not handed to a waiting thread: the engine thread, re-taking it right
        # after each step, could starve a synchronous caller for many steps. Callers hold the
        # turnstile while they wait for the lock, and the engine thread passes through it before
        # each turn, so a waiting caller gets the lock after at most one turn.
        self._turnstile = threading.Lock()
        # What callers queue for the engine thread; its own small lock is held only to append or
        # drain, never during a step, so queueing never waits for the engine.
        self._inbox: collections.deque[_Command] = collections.deque()
        self._wake = threading.Condition(threading.Lock())
        self._sinks: dict[str, _Sink] = {}
        # Items for streams, by event loop, sent once per turn: one wake-up of each loop per step
        # rather than one per stream (each wake-up hands over the GIL, which other threads hold).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        self._scoring: collections.deque[_Score] = collections.deque()
        self._stream_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = StepStats(0, 0.0, 0.0)

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
        """Hold the engine lock, taking it ahead of the engine thread's next turn."""
        with self._turnstile, self._lock:
            yield

    def _post(self, command: _Command) -> None:
        """Queue a command for the engine thread and wake it (never waits for the engine)."""
        with self._wake:
            if self._closed:
                self._refuse(command, "this LLM is closed; create a new one.")
                return
            self._inbox.append(command)
            self._wake.notify()
        self._ensure_thread()

    @staticmethod
    def _refuse(command: _Command, reason: str) -> None:
        """Answer a command that will never run (its stream is told at once, not via the outbox)."""
        if isinstance(command, _Add):
            loop, queue = command.sink.loop, command.sink.queue
            if loop is not None and queue is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                    loop.call_soon_threadsafe(queue.put_nowait, InferError(reason))
        elif isinstance(command, _Score) and not command.future.done():
            command.future.set_exception(InferError(reason))

    def _apply_inbox_locked(self) -> None:
        """Apply what was queued, in order: adds (answering each caller), aborts, scoring jobs."""
        with self._wake:
            commands = list(self._inbox)
            self._inbox.clear()
        for command in commands:
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.prompt, command.params, request_id=command.request_id)
                except Exception as exc:  # the caller gets the refusal; the engine is unaffected
                    self._send(command.sink, exc)
                    continue
                self._sinks[command.request_id] = command.sink
                self._send(command.sink, True)
            elif isinstance(command, _Abort):
                self._sinks.pop(command.request_id, None)
                self.engine.abort_request(command.request_id)
            else:
                self._scoring.append(command)
        self._flush()

    def _send(self, sink: _Sink, item: Any) -> None:
        """Hand an item to a sink: a synchronous one now, a stream's at the next :meth:`_flush`."""
        if sink.loop is None or sink.queue is None:
            assert sink.deliver is not None
            sink.deliver(item)
        else:
            self._outbox.setdefault(sink.loop, []).append((sink.queue, item))

    def _flush(self) -> None:
        """Send the streams' items: one call into each event loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                loop.call_soon_threadsafe(_put_all, items)

    def _score_locked(self) -> None:
        """Run one chunk of the oldest echo-scoring job (at most one step's token budget)."""
        while self._scoring and self._scoring[0].cancelled:
            self._scoring.popleft()
        if not self._scoring:
            return
        job = self._scoring[0]
        try:
            job.scorer.advance(self.engine.config.max_num_batched_tokens)
        except Exception as exc:
            self._scoring.popleft()
            job.future.set_exception(exc)
            return
        if job.scorer.finished:
            self._scoring.popleft()
            job.future.set_result(job.scorer.result)

    def _step_locked(self) -> None:
        self._apply_inbox_locked()
        if not self.engine.has_unfinished_requests():
            return
        start = time.perf_counter()
        outputs = self.engine.step()
        took = time.perf_counter() - start
        stats = self._stats
        self._stats = stats._replace(steps=stats.steps + 1, max_step_s=max(stats.max_step_s, took))
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None and not sink.closed and (out.finished or not sink.final_only):
                self._send(sink, sink.view(out))
            if out.finished:
                self._sinks.pop(out.request_id, None)
        self._flush()

    def _add_locked(self, prompt: Prompt, params: SamplingParams, sink: _Sink) -> str:
        request_id = self.engine.add_request(prompt, params)
        self._sinks[request_id] = sink
        return request_id

    def step_stats(self) -> StepStats:
        """Engine steps run and the longest step and engine-thread turn since the last reset."""
        return self._stats

    def reset_step_stats(self) -> None:
        """Start :meth:`step_stats` afresh (for measuring one stretch of work)."""
        self._stats = StepStats(0, 0.0, 0.0)

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
        batch = as_batch(prompts)
        params = as_params(sampling_params, len(batch))
        # Compile constraints here, without the engine lock, so a bad one raises before anything is
        # queued and a slow one never holds up the engine thread's steps.
        for prompt, p in zip(batch, params, strict=True):
            if p.guided_kind is not None:
                self.check_guided(p, None if isinstance(prompt, str) else len(prompt))
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

    def check_guided(self, params: SamplingParams, num_prompt_tokens: int | None = None) -> None:
        """Compile the constraint of ``params`` (if it has one) now, so a bad one fails before queueing.

        The engine caches compiled constraints, so the request that follows does not compile again.
        It blocks for as long as compiling takes (milliseconds for a typical JSON schema): a server
        calls it off its event loop.

        Args:
            params: The request's sampling parameters.
            num_prompt_tokens: The prompt's length, when known: without ``max_tokens`` a JSON schema
                is bounded to what the context leaves after the prompt (see the engine).

        Raises:
            InvalidRequestError: the constraint cannot be compiled (``param`` names its ``guided_*``
                field; the message is the grammar library's).
        """
        if params.guided_kind is not None:
            self.engine.compile_guided(params, num_prompt_tokens)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template.

        With ``tools``, the template renders them, and each reply's calls come back in its outputs'
        ``tool_calls`` (a list, empty when it made none) while ``text`` keeps only the content
        outside the calls. ``tool_choice="auto"`` lets the model choose and finds the calls with the
        tool-call parser (``LLM(tool_call_parser=...)``, else the one the chat template's markers
        name, else hermes); ``"required"`` and a named function generate the call under a grammar,
        so even a weak model returns calls whose arguments validate against the tool's schema.
        ``response_format`` ``json_object`` or ``json_schema`` constrains the reply to JSON. A reply
        cut short by ``max_tokens`` is returned as text (``finish_reason == "length"``).

        Args:
            messages: One conversation (OpenAI chat messages, including assistant ``tool_calls``
                and ``tool`` results), or a list of them.
            sampling_params: One set for all conversations, or one per conversation.
            tools: OpenAI function tools, ``{"type": "function", "function": {"name", "description",
                "parameters"}}``.
            tool_choice: ``"none"``, ``"auto"`` (the default with tools), ``"required"``, or
                ``{"type": "function", "function": {"name": ...}}``.
            response_format: ``{"type": "text" | "json_object" | "json_schema", "json_schema":
                {"name", "schema", "strict"}}``.
            parallel_tool_calls: Whether a reply may make more than one call.
            chat_template: A template string or name instead of the tokenizer's own.
            add_generation_prompt: End the prompt with the header that starts an assistant turn.
            use_tqdm: Show a progress bar (default: only on an interactive terminal).
            **template_kwargs: Further chat template variables.

        Raises:
            InvalidRequestError: a malformed message, tool, ``tool_choice`` or ``response_format``, a
                constraint that does not compile, or invalid sampling parameters (nothing is queued).
        """
        conversations = as_conversations(messages)
        params = as_params(sampling_params, len(conversations))
        plans = [
            plan_chat(
                self.tokenizer, conv, p, tools=tools, tool_choice=tool_choice,
                response_format=response_format, parallel_tool_calls=parallel_tool_calls,
                tool_call_parser=self.tool_call_parser, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, **template_kwargs,
            )
            for conv, p in zip(conversations, params, strict=True)
        ]  # fmt: skip
        for plan in plans:  # a constraint that does not compile fails here, before anything is queued
            self.check_guided(plan.params, len(plan.prompt_ids))
        outs = self.generate([plan.prompt_ids for plan in plans], [plan.params for plan in plans],
                             use_tqdm=use_tqdm)  # fmt: skip
        for plan, out in zip(plans, outs, strict=True):
            for c in out.outputs:
                if plan.offers_tools:
                    parsed = plan.parse(c.text)
                    c.tool_calls = parsed.tool_calls
                    c.text = parsed.content or ""
                elif tools:  # tool_choice "none": offered, so a list, but the text is left alone
                    c.tool_calls = []
        return outs

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
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer.encode(text)``, letting other threads run meanwhile.

        The Rust tokenizer holds the GIL through a single ``encode`` (seconds for megabytes of text,
        stalling an event loop in another thread) but releases it in ``encode_batch``, whose ids are
        the same.
        """
        if not text:
            return []
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    # -- protocol: stream --------------------------------------------------------------------------------
    async def stream(
        self, prompt: Prompt | Sequence[Message], sampling_params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's progress as deltas: each output carries only the new text and tokens.

        ``prompt`` may also be a conversation (a list of messages), rendered with the chat template.
        Rendering and tokenizing a long prompt run in a worker thread, and the request reaches the
        engine through a queue, so the event loop never waits for the engine. Closing or cancelling
        the generator queues the request's abort, which frees its KV blocks before the next step.

        Raises:
            InvalidRequestError: the engine refused the request (raised by the first iteration).
            InferError: the LLM is closed.
        """
        if self._closed:
            raise InferError("this LLM is closed; create a new one to stream.")
        text: str | None = None
        if is_conversation(prompt):
            ids = await asyncio.to_thread(self.render_chat, cast(Sequence[Message], prompt))
        elif isinstance(prompt, str):
            text = prompt
            ids = (
                self._encode(text)
                if len(text) <= _INLINE_TEXT
                else await asyncio.to_thread(self._encode, text)
            )
        else:
            ids = list(cast(Sequence[int], prompt))
        request = self.submit(ids, sampling_params, prompt_text=text)
        try:
            async for out in request:
                yield out
        finally:
            request.abort()

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        prompt_text: str | None = None,
    ) -> RequestStream:
        """Queue a request for the engine thread and return at once (call it on an event loop).

        The engine checks the request when it takes it, before its next step: await
        :meth:`RequestStream.started` for its answer, then iterate the stream for the outputs. A
        prompt that cannot fit the context is refused here already, without queueing anything.

        Args:
            prompt_ids: The prompt's token ids.
            sampling_params: Sampling parameters (default ``SamplingParams()``).
            prompt_text: The prompt's text, reported as the outputs' ``prompt``.

        Raises:
            InvalidRequestError: the prompt leaves no room to generate in the model's context.
            InferError: the LLM is closed.
        """
        if self._closed:
            raise InferError("this LLM is closed; create a new one to stream.")
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:  # the engine's own check, before the ids cross threads
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens and the model's context is {limit}: no room left "
                f"to generate; shorten it to at most {limit - 1} tokens.",
                param="prompt",
            )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sink = _Sink(loop=asyncio.get_running_loop(), queue=queue, delta=True, prompt_text=prompt_text)
        request_id = f"stream-{next(self._stream_ids)}"
        request = RequestStream(self, request_id, queue, sink)
        self._post(_Add(request_id, list(prompt_ids), sampling_params or SamplingParams(), sink))
        return request

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._wake:
                if self._closed or (self._thread is not None and self._thread.is_alive()):
                    return
                self._thread = threading.Thread(target=self._serve, name="lmstack-engine", daemon=True)
                self._thread.start()

    def _has_work(self) -> bool:
        return bool(self._inbox) or bool(self._scoring) or self.engine.has_unfinished_requests()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._has_work():
                    self._wake.wait()
                if self._closed:
                    return
            with self._turnstile:  # let a caller waiting for the lock go first
                pass
            with self._lock:
                if self._closed:
                    return
                start = time.perf_counter()
                try:
                    self._apply_inbox_locked()
                    self._score_locked()
                    self._step_locked()
                except Exception:  # a broken step must not hang every waiting stream
                    logger.exception("engine step failed; aborting all requests")
                    self._abort_all_locked("the engine step failed; see the server log")
                took = time.perf_counter() - start
                self._stats = self._stats._replace(max_turn_s=max(self._stats.max_turn_s, took))

    def _abort_all_locked(self, reason: str) -> None:
        """Finish every routed request with an error, so no waiting caller hangs."""
        for request_id in list(self._sinks):
            out = self.engine.abort_request(request_id)
            sink = self._sinks.pop(request_id)
            if out is not None and not sink.closed:
                out.error = out.error or reason
                out.finished = True
                self._send(sink, sink.view(out))
        self._flush()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse_scoring(self, what: str) -> None:
        """Scoring runs the model outside the engine's steps, which tensor-parallel workers never see."""
        tp = self.engine.config.tensor_parallel_size
        if tp > 1:
            raise InvalidRequestError(
                f"{what} is not supported with tensor_parallel_size={tp} yet (scoring runs the model "
                "outside the engine's steps); score with an LLM of tensor_parallel_size=1."
            )

    def close(self) -> None:
        """Stop the background thread; pending streams end with an error and their blocks are freed.

        Under tensor parallelism this also stops the worker processes; the LLM cannot run afterwards.
        """
        with self._wake:
            self._closed = True
            pending = list(self._inbox)
            self._inbox.clear()
            self._wake.notify_all()
        with self._turnstile, self._lock:
            reason = "the LLM was closed"
            for command in pending:
                if isinstance(command, _Abort):
                    self._sinks.pop(command.request_id, None)
                    self.engine.abort_request(command.request_id)
                else:
                    self._refuse(command, f"{reason} before the request started.")
            while self._scoring:
                self._refuse(self._scoring.popleft(), f"{reason} while the prompt was scored.")
            self._abort_all_locked(reason)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._turnstile, self._lock:  # after the engine thread's last turn
            self.engine.close()

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

        Raises:
            InvalidRequestError: if a pair is malformed, its continuation empty or too long, or its
                token ids outside the vocabulary (nothing is scored then).
        """
        self._refuse_scoring("loglikelihood")
        pairs = [split_pair(self.engine, ctx, cont) for ctx, cont in requests]
        disable = None if use_tqdm is None else not use_tqdm
        with tqdm(total=len(pairs), desc="Scoring", unit="req", disable=disable) as bar:
            return score_pairs(self.engine, pairs, max_batch_tokens, bar.update)

    def loglikelihood_rolling(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        max_batch_tokens: int = 4096,
        use_tqdm: bool | None = None,
    ) -> list[float]:
        """Log-likelihood of each whole text, scored in rolling windows: perplexity and bits per byte.

        For each text, the summed log-probability of all its tokens, the first one conditioned on the
        tokenizer's bos (else eos) token, as lm-evaluation-harness's ``loglikelihood_rolling`` computes
        it. A text longer than ``max_length`` tokens is cut into windows: the first predicts its
        first ``max_length`` tokens, each later one the next ``max_length`` (fewer at the end), seeing
        the ``max_length`` tokens before its last one, so every token is scored exactly once.

        Text is tokenized as lm-evaluation-harness's HF model does: with the tokenizer's special
        tokens (a leading bos where the tokenizer adds one), unless it already starts with the prefix
        token's text. Token-id lists are taken as already tokenized. A text with no tokens (an empty
        id list) scores 0.0, as in lm-evaluation-harness. The windows of all texts are packed into
        forwards together, and each window attends only to its own tokens, so a text's score does not
        depend on which other texts are scored with it or on ``max_batch_tokens`` (beyond float
        rounding: a matmul may round one row differently next to other rows, about 1e-7 relative).

        Args:
            texts: Texts, or token-id lists (a list of them, even for one).
            max_length: Most tokens the model sees in one window (default: ``max_model_len``).
            max_batch_tokens: Token budget of one packed forward pass (a longer window runs alone).
            use_tqdm: Show a progress bar over the windows (default: only on an interactive terminal).

        Returns:
            One summed log-probability per text, in the texts' order.

        Raises:
            InvalidRequestError: ``max_length`` below 2 or above ``max_model_len``, an item that is
                neither text nor token ids, or ids outside the vocabulary (nothing is scored then).
        """
        self._refuse_scoring("loglikelihood_rolling")
        limit = self.engine.max_model_len
        length = check_max_length(max_length, limit) or limit
        token_lists = rolling_token_lists(texts, self.tokenizer, self.engine.vocab_size)
        pairs, owners = plan_rolling(token_lists, self.tokenizer, length)
        disable = None if use_tqdm is None else not use_tqdm
        with tqdm(total=len(pairs), desc="Scoring windows", unit="win", disable=disable) as bar:
            scores = score_pairs(self.engine, pairs, max_batch_tokens, bar.update)
        return sum_rolling(len(token_lists), owners, [logprob for logprob, _ in scores])

    def prompt_logprobs(self, token_ids: Sequence[int], top_k: int = 0) -> list[dict[int, float] | None]:
        """Log-probability of each prompt token given the tokens before it, from one forward pass.

        This is what an OpenAI ``echo`` + ``logprobs`` completion reports for the prompt, and what
        :meth:`loglikelihood` sums: the raw model distribution (no penalties, no temperature). It runs
        on the engine thread in chunks of at most a step's token budget (``max_num_batched_tokens``),
        one chunk between two engine steps, so a long prompt never holds up the running requests for
        more than a step's worth of work; it does not touch the KV cache. This call blocks until
        the whole prompt is scored: a server calls it off its event loop.

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
        self._refuse_scoring("prompt_logprobs (echo with logprobs)")
        ids = check_prompt(self.engine, token_ids, top_k)
        if len(ids) < 2:
            return [None]
        job = _Score(_PromptScorer(self.engine, ids, top_k), concurrent.futures.Future())
        self._post(job)
        try:
            return job.future.result()
        except BaseException:
            job.cancelled = True  # interrupted: the engine thread drops the rest of the job
            raise
