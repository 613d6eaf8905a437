"""The offline API, ``LLM(path).generate(prompts, SamplingParams(...))``, and the local LLM protocol.

:class:`LLM` wraps one :class:`~lmstack.infer.engine.LLMEngine`. Synchronous calls
(:meth:`LLM.generate`, :meth:`LLM.chat`) drive the engine in the caller's thread; async streams
(:meth:`LLM.stream`) are served by a background thread. Both share the engine under a lock, so a
stream and a batch generation run in the same continuous batch. Every step's outputs are routed to
the caller that owns each request. Scoring (:meth:`LLM.loglikelihood`,
:meth:`LLM.loglikelihood_rolling`, :meth:`LLM.prompt_logprobs`) runs packed forwards of its own,
written in :mod:`lmstack.infer._scoring`.
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

from lmstack.core import CausalLM, Tokenizer, load_pretrained
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
from lmstack.infer._scoring import check_prompt, prompt_logprobs, score_pairs, split_pair
from lmstack.infer.engine import EngineConfig, LLMEngine
from lmstack.infer.tools import get_tool_parser, plan_chat

__all__ = ["LLM"]

logger = logging.getLogger(__name__)


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
        tool_call_parser: How :meth:`chat` finds the tool calls in a reply with ``tool_choice="auto"``
            (a name of :data:`lmstack.infer.tools.TOOL_PARSERS`: ``"hermes"``, ``"internlm2"``,
            ``"llama3_json"``, ``"mistral"``); default: detected from the chat template, else hermes.
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
        tool_call_parser: str | None = None,
        **engine_options: Any,
    ) -> None:
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # an unknown name fails before the model loads
        self.tool_call_parser = tool_call_parser
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
        if is_conversation(prompt):
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

        Raises:
            InvalidRequestError: if a pair is malformed, its continuation empty or too long, or its
                token ids outside the vocabulary (nothing is scored then).
        """
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
        ids = check_prompt(self.engine, token_ids, top_k)
        with self._locked():
            return prompt_logprobs(self.engine, ids, top_k)
