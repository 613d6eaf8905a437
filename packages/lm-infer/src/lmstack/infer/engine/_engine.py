"""The synchronous engine: requests in, one batched forward per step, outputs out.

Each :meth:`LLMEngine.step` asks the scheduler which sequences run and how many tokens each (decode
tokens and prefill chunks together, under a token budget), builds one flattened batch with its
positions and KV slots, runs the model once with a :class:`PagedAttention` backend, samples the
sequences whose chunk reached their end, and feeds the new tokens back (detokenizing, matching stop
strings, finishing sequences). Requests join and leave at every step.

The per-sequence step state lives in a persistent batch (:class:`~._input_batch.InputBatch`): a row
per running sequence holding its block table, last sampled token, sampling parameters and penalty
counts, written when it joins and freed when it leaves. A step copies only what changed (a new
block, the sampled tokens) and builds ids, positions, slots and the sampling tensors with tensor
operations over the scheduled rows; Python loops over requests only to hand their new tokens to
the detokenizers and stop checks.

A request with a ``guided_*`` constraint waits outside the scheduler until its grammar is compiled (in
a worker thread, see :mod:`~lmstack.infer.engine._guided`); it then runs in the same batches as the
others, its logits masked by its grammar every step.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lmstack.core import CausalLM, ConfigError, ModelConfig, Tokenizer
from lmstack.core.checkpoint import parse_size
from lmstack.infer._errors import InferError, InvalidRequestError
from lmstack.infer._inputs import check_token_ids
from lmstack.infer._outputs import CompletionOutput, RequestOutput
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._detokenizer import IncrementalDetokenizer
from lmstack.infer.engine._guided import GrammarCache
from lmstack.infer.engine._input_batch import InputBatch
from lmstack.infer.engine._kernel_attention import KernelPagedAttention
from lmstack.infer.engine._paged_attention import KVCache, PagedAttention, kv_bytes_per_block
from lmstack.infer.engine._sampler import Sampler, SamplingState, make_generator
from lmstack.infer.engine._scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from lmstack.infer.engine._sequence import Sequence, SequenceStatus
from lmstack.infer.engine._tensor_parallel import (
    ModelStep,
    TensorParallelGroup,
    check_tensor_parallel_model,
    local_model_config,
)
from lmstack.infer.kernels import PagedKV, QuantizedKVLayout, apply_kernels, resolve_kernels

__all__ = ["EngineConfig", "LLMEngine"]

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass
class EngineConfig:
    """How the engine sizes its KV cache and batches.

    Attributes:
        block_size: Token slots per KV block.
        num_kv_blocks: KV blocks to allocate; overrides ``kv_cache_memory``.
        kv_cache_memory: KV cache budget in bytes or as ``"2GB"``; default: enough for
            ``max_num_seqs`` full-context sequences, capped at 1 GiB.
        max_num_seqs: Most sequences in one step.
        max_num_batched_tokens: Token budget of one step (prefill chunks plus decode tokens).
        max_model_len: Longest sequence (prompt plus output); default: the model's
            ``max_position_embeddings``.
        enable_prefix_caching: Share full KV blocks between requests with a common prefix.
        enable_chunked_prefill: Split long prompts across steps under the token budget.
        kv_cache_dtype: Storage of the cache: a float dtype (default: the model's), or ``"int8"`` /
            ``"int4"`` for a quantized cache (asymmetric codes with a scale and zero point per token and
            KV head, quantized as written, dequantized as read): the same byte budget then holds about
            2x / 3-4x more tokens (see :attr:`LLMEngine.kv_bytes_per_token`).
        kernels: ``"auto"`` (Triton on CUDA when it is installed, torch otherwise), ``"triton"`` or
            ``"torch"``; chosen once here. The ``LMSTACK_KERNELS`` environment variable overrides
            ``"auto"``.
        fuse_weights: Fuse q/k/v and gate/up and lay weights out for this device at load, in place
            (:meth:`~lmstack.core.CausalLM.prepare_for_inference`); checkpoints keep the HF layout.
            Skipped under tensor parallelism (the shards keep the training layout).
        weight_layout: How fused weights are stored: ``"auto"``, ``"onednn"``, ``"dense"`` or ``"gemv"``
            (see :meth:`~lmstack.core.CausalLM.prepare_for_inference`). ``"auto"`` picks ``"gemv"``,
            lmstack's compiled CPU kernel for one-row products, when ``max_num_seqs`` is 1 and the model
            is float32 on a CPU where the kernel builds (single-stream decode 1.2-1.4x faster than on
            oneDNN's packed weights in the engine benchmark), and oneDNN's packed weights otherwise.
        tensor_parallel_size: Processes the model is sharded over (heads, feed-forward width and
            vocabulary; see :mod:`~lmstack.infer.engine._tensor_parallel`). Above 1 the KV cache of
            each rank holds its own kv heads, so the byte budget (``kv_cache_memory``, per rank) holds
            that many times the tokens; ``kernels`` must be ``"auto"`` (torch) or ``"torch"``. Set it
            through ``LLM(path, tensor_parallel_size=N)``, which starts the worker processes.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: torch.dtype | str | None = None
    kernels: str = "auto"
    fuse_weights: bool = True
    weight_layout: str = "auto"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_kv_blocks",
            "max_model_len",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(
                    f"EngineConfig.{name} must be a positive integer, got {value!r}.", field=name
                )
        _kv_cache_kind(self.kv_cache_dtype, torch.float32)  # an unknown kind fails here, not at load
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(
                f"EngineConfig.kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}.",
                field="kernels",
            )
        if self.weight_layout not in ("auto", "onednn", "dense", "gemv"):
            raise ConfigError(
                f"EngineConfig.weight_layout must be 'auto', 'onednn', 'dense' or 'gemv', got "
                f"{self.weight_layout!r}.",
                field="weight_layout",
            )


@dataclass
class _Row:
    """One row's draw: the token, its log-prob, and the step's top log-probs (when any row asked)."""

    token_id: int
    logprob: float
    top_values: list[float] | None = None
    top_ids: list[int] | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    generators: list[torch.Generator | None]
    outputs: list[CompletionOutput]
    error: str | None = None
    reported_finished: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    matchers: list[Any] = field(default_factory=list)  # one grammar matcher per sample when guided

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.is_finished for s in self.seqs)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    Not thread-safe: drive it from one thread (the :class:`~lmstack.infer.LLM` wrapper serialises
    access for its async streams).

    Args:
        model: The model (its parameters' device and dtype are used). With
            ``config.tensor_parallel_size > 1``, rank 0's shard of a tensor-parallel model.
        tokenizer: Its tokenizer.
        config: Cache and batching settings.
        tensor_parallel: Rank 0's handle on the other ranks' processes: each step's inputs are
            broadcast to them before the forward. Without it a tensor-parallel engine is a worker's
            replica, which only runs the steps it receives.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        *,
        tensor_parallel: TensorParallelGroup | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        tp = config.tensor_parallel_size
        if tp > 1:
            check_tensor_parallel_model(model, tp)
            if config.kernels == "triton":
                raise ConfigError(
                    "kernels='triton' is not supported with tensor_parallel_size > 1 yet; use 'torch'.",
                    field="kernels",
                )
        if tensor_parallel is not None and tensor_parallel.size != tp:
            raise ConfigError(
                f"the tensor-parallel group has {tensor_parallel.size} ranks but "
                f"EngineConfig.tensor_parallel_size is {tp}.",
                field="tensor_parallel_size",
            )
        self._tp = tensor_parallel
        if config.fuse_weights and tp == 1:  # one GEMM for q/k/v and for gate/up, packed for this device
            model.prepare_for_inference(
                config.weight_layout,  # type: ignore[arg-type]  # checked in EngineConfig
                single_sequence=config.max_num_seqs == 1,
            )
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Triton or torch, once: norms, rotary and activation switch modules; attention switches backend.
        self.kernels = resolve_kernels(config.kernels if tp == 1 else "torch", self.device)
        if self.kernels == "triton":
            apply_kernels(model)
        mc = model.config
        # What attention sees on this rank: its share of the heads (the KV cache holds only those).
        local = local_model_config(mc, tp)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        _check_context(mc, self.max_model_len)
        self.vocab_size = mc.vocab_size
        kv_dtype, kv_bits = _kv_cache_kind(config.kv_cache_dtype, self.dtype)
        assert local.num_key_value_heads is not None and local.head_dim is not None
        kv_layout = None if kv_bits is None else QuantizedKVLayout(kv_bits, local.head_dim)
        if kv_layout is None:
            per_block = kv_bytes_per_block(local, config.block_size, kv_dtype)
        else:
            per_token = kv_layout.bytes_per_token(local.num_hidden_layers, local.num_key_value_heads)
            per_block = per_token * config.block_size
        #: KV-cache bytes one token takes, across layers, keys and values (codes and scales included).
        self.kv_bytes_per_token = per_block // config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory is not None:
            num_blocks = parse_size(config.kv_cache_memory) // per_block
        else:
            wanted = config.max_num_seqs * math.ceil(self.max_model_len / config.block_size)
            num_blocks = min(wanted, (1 << 30) // per_block)
        if num_blocks < 1:
            raise ConfigError(
                f"the KV cache budget holds no block (one block takes {per_block} bytes); "
                "raise kv_cache_memory.",
                field="kv_cache_memory",
            )
        if kv_layout is None:
            self.cache: KVCache | None = KVCache(local, num_blocks, config.block_size, kv_dtype, self.device)
            self.kv = PagedKV(self.cache.keys, self.cache.values)
        else:
            self.cache = None  # only the kernels' backend reads a quantized cache
            self.kv = kv_layout.allocate(
                mc.num_hidden_layers, num_blocks * config.block_size, local.num_key_value_heads, self.device
            )
        # Which attention backend a step uses: None = PagedAttention (the CPU float path, which reads
        # decoding sequences in place); else KernelPagedAttention with the kernels or their references.
        self._kernel_attention: Literal["triton", "torch"] | None = (
            "triton" if self.kernels == "triton" else "torch" if kv_layout is not None else None
        )
        # A region per full-context sequence: a decoding sequence whose blocks stay consecutive is read
        # by attention in place, without copying its keys and values (see _paged_attention).
        regions = -(-self.max_model_len // config.block_size)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, region_blocks=regions
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_model_len=self.max_model_len,
            ),
            self.block_manager,
        )
        self.sampler = Sampler()
        self._windows = sorted({mc.window_of(i) for i in range(mc.num_hidden_layers)}, key=lambda w: w or 0)
        self._requests: dict[str, _Request] = {}
        # Guided requests whose grammar is still compiling: not yet in the scheduler.
        self._compiling: dict[str, concurrent.futures.Future[Any]] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        eos = mc.eos_token_id if mc.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        # Checked once here, so the sampler can mask them every step without checking again.
        self.eos_token_ids = sorted({t for t in eos_ids if 0 <= t < self.vocab_size})
        self.guided = GrammarCache(tokenizer, self.vocab_size, self.eos_token_ids)
        # The persistent batch: one row per running sequence, written when it joins, freed when it
        # leaves; a sequence never holds more blocks than its context or the whole cache.
        max_blocks = min(-(-self.max_model_len // config.block_size), num_blocks)
        sampling = SamplingState(self.vocab_size, self.device, eos_token_ids=self.eos_token_ids,
                                 capacity=min(config.max_num_seqs, 64))  # fmt: skip
        self.input_batch = InputBatch(max_blocks, config.block_size, self.device, sampling,
                                      capacity=min(config.max_num_seqs, 64))  # fmt: skip
        logger.info(
            "KV cache: %d blocks x %d tokens, %s, %d bytes a token (%.1f MB); %s kernels",
            num_blocks,
            config.block_size,
            f"int{kv_bits}" if kv_bits else str(kv_dtype).removeprefix("torch."),
            self.kv_bytes_per_token,
            per_block * num_blocks / 1e6,
            self.kernels,
        )
        if tensor_parallel is not None:  # the workers built the same engine: wait for them, compare
            tensor_parallel.check_ready(num_blocks)

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; it starts at the next step.

        Args:
            prompt: Text (encoded with the tokenizer's special tokens) or token ids.
            params: Sampling parameters (default: ``SamplingParams()``).
            request_id: A unique id (default: a new one).

        Returns:
            The request id.

        Raises:
            InvalidRequestError: for an empty prompt, ids outside the vocabulary, a prompt that
                leaves no room to generate, a request the whole KV cache cannot hold, unknown stop
                token ids or a duplicate id; ``param`` names the field at fault. Nothing is queued
                and the engine is unaffected. Nothing later re-checks the request. A ``guided_*``
                constraint already known not to compile is refused here too; one still compiling is
                checked when it is done, and failing then finishes the request with ``error``.
        """
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use.")
        text: str | None = None
        if isinstance(prompt, str):
            text, prompt = prompt, self.tokenizer.encode(prompt) if prompt else []
        prompt_ids = check_token_ids(prompt, self.vocab_size)
        max_total = self._max_total_tokens(len(prompt_ids), params)
        compiled = None
        if params.guided_kind is not None:
            compiled = self.guided.submit(params, self._guided_budget(params, len(prompt_ids)))
        if compiled is not None and compiled.done() and compiled.exception() is not None:
            raise compiled.exception()  # type: ignore[misc]
        req = _Request(request_id, text, prompt_ids, params, [], [], [], [])
        for index in range(params.n):
            # Samples share the prompt list (never mutated) and the completion shares the sequence's
            # output list: generated ids are kept once.
            seq = Sequence(next(self._seq_ids), request_id, prompt_ids, max_total)
            seq.cache_salt = _cache_salt(self.model.config, len(prompt_ids))
            req.seqs.append(seq)
            req.detoks.append(
                IncrementalDetokenizer(self.tokenizer, prompt_ids, params, eos_token_ids=self.eos_token_ids)
            )
            # On the logits' device: a CPU generator cannot draw a CUDA row's noise.
            seed = params.seed
            req.generators.append(None if seed is None else make_generator(seed, index, self.device))
            req.outputs.append(
                CompletionOutput(
                    index,
                    token_ids=seq.output_token_ids,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
            )
        self._requests[request_id] = req
        if compiled is not None and not compiled.done():
            self._compiling[request_id] = compiled
        else:
            self._admit(req, compiled)
        return request_id

    def _guided_budget(self, params: SamplingParams, num_prompt: int) -> int:
        """The token budget ``guided_json_fit`` bounds JSON to: ``max_tokens``, or what the context leaves.

        When the context leaves less than ``max_tokens`` (or ``max_tokens`` is unset), what it leaves
        is rounded down to a power of two, so that requests whose prompts differ in length still
        share a compiled grammar.
        """
        left = max(self.max_model_len - num_prompt, 1)
        if params.max_tokens is not None and params.max_tokens <= left:
            return params.max_tokens
        return 1 << (left.bit_length() - 1)

    def compile_guided(
        self, params: SamplingParams, num_prompt_tokens: int | None = None, timeout: float | None = None
    ) -> None:
        """Compile the ``guided_*`` constraint of ``params`` now, or find it compiled (cached).

        Callers that must refuse a bad constraint before queueing anything (the server, for a 400)
        call this first, in their own thread; the request added afterwards finds the grammar ready.
        Thread-safe; a no-op without a constraint.

        Args:
            params: The request's sampling parameters.
            num_prompt_tokens: The prompt's length, when known: without ``max_tokens`` a JSON schema is
                bounded to what the context leaves after the prompt, so the engine finds the same
                compiled grammar when the request comes.
            timeout: Most seconds to wait for the compilation (default: no limit).

        Raises:
            InvalidRequestError: The constraint cannot be compiled; ``param`` names its field and the
                message quotes the grammar library's.
        """
        if params.guided_kind is None:
            return
        budget = self._guided_budget(params, num_prompt_tokens or 0)
        self.guided.compile(params, budget, timeout)

    def _admit(self, req: _Request, compiled: concurrent.futures.Future[Any] | None) -> None:
        """Hand a request to the scheduler, with one matcher per sample when it is guided."""
        if compiled is not None:
            template = compiled.result()
            req.matchers = [self.guided.new_matcher(template) for _ in req.seqs]
        for seq in req.seqs:
            # The scheduler serves sequences in arrival order, by id: a request that waited for its
            # grammar arrives now, after those admitted meanwhile.
            seq.seq_id = next(self._seq_ids)
            self.scheduler.add(seq)

    def _admit_compiled(self, touched: dict[str, _Request]) -> None:
        """Admit the guided requests whose grammar is ready; fail those whose grammar failed."""
        for request_id, future in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            req = self._requests.get(request_id)
            if req is None:
                continue
            error = future.exception()
            if error is None:
                self._admit(req, future)
            else:
                self._fail(req, str(error))
                touched[request_id] = req

    def _max_total_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        """The request's longest sequence (prompt plus output); raises if it can never run.

        With the token-id check in :meth:`add_request`, this is the one place a request is checked:
        the scheduler and the sampler rely on it and check nothing per request.
        """
        limit = self.max_model_len
        if num_prompt >= limit:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens and the model's context is {limit}: no room left to "
                f"generate; shorten it to at most {limit - 1} tokens.",
                param="prompt",
            )
        params.validate_for_vocab(self.vocab_size)
        bs = self.config.block_size
        capacity = self.block_manager.num_blocks * bs  # a sequence may use the whole cache, no more
        if params.max_tokens is None:
            # Up to the end of the context, or of the whole KV cache when that is smaller.
            if num_prompt >= capacity:
                raise InvalidRequestError(
                    f"the prompt has {num_prompt} tokens and the KV cache holds {capacity}: no room left "
                    "to generate; shorten the prompt or give the cache more memory.",
                    param="prompt",
                )
            return min(limit, capacity)
        max_total = min(num_prompt + params.max_tokens, limit)
        if max_total > capacity:
            raise InvalidRequestError(
                f"the prompt ({num_prompt} tokens) and up to {max_total - num_prompt} generated tokens need "
                f"{max_total} tokens of KV cache, but the whole cache holds {capacity} "
                f"({self.block_manager.num_blocks} blocks of {bs}); lower max_tokens, shorten the prompt or "
                "give the cache more memory.",
                param="max_tokens",
            )
        return max_total

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._compiling.pop(request_id, None)
        self.scheduler.abort(request_id)
        for seq in req.seqs:
            self.input_batch.remove(seq)
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED_ABORTED
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is still queued or running."""
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        """Requests queued or running."""
        return len(self._requests)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and one forward; return the outputs of requests that changed.

        A request whose sampling or detokenization raises finishes alone with ``error`` set; the
        others in the batch carry on exactly as they would have without it.
        """
        touched: dict[str, _Request] = {}
        if self._compiling:
            self._admit_compiled(touched)
        plan = self.scheduler.schedule()
        for seq in plan.failed:
            req = self._requests.get(seq.request_id)
            if req is not None:
                self._fail(req, seq.error or "the request failed")
                touched[req.request_id] = req
        finished_ids: set[int] = set()
        # A sequence aborted since schedule() (its failed sibling's request) holds no blocks: skip it.
        scheduled = [s for s in plan.scheduled if not s.seq.is_finished]
        if scheduled:
            finished_ids = self._run(scheduled, touched)
            done = self.scheduler.update(scheduled, finished_ids)
            for seq in done:
                self.input_batch.remove(seq)
                req = self._requests.get(seq.request_id)
                if req is not None:
                    touched[req.request_id] = req
        elif self._compiling and not touched:
            # Only grammars are being compiled: wait for one rather than spin the caller's loop.
            concurrent.futures.wait(list(self._compiling.values()), timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)  # fmt: skip
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                self._requests.pop(req.request_id, None)
        return outputs

    def _run(self, scheduled: list[ScheduledSeq], touched: dict[str, _Request]) -> set[int]:
        batch = self.input_batch
        rows = [batch.row_of(item.seq) for item in scheduled]
        if None in rows:  # sequences scheduled for the first time join the persistent batch
            for item, row in zip(scheduled, rows, strict=True):
                if row is None and not item.seq.is_finished:
                    self._join(item.seq, touched)
            # A request whose parameters failed holds no blocks now: leave it out of the forward.
            scheduled = [item for item in scheduled if not item.seq.is_finished]
            if not scheduled:
                return set()
            rows = [batch.row_of(item.seq) for item in scheduled]
        inputs = batch.prepare(scheduled, rows)  # type: ignore[arg-type]  # every row is set now
        sampled = inputs.sampled
        step = ModelStep(
            token_ids=inputs.token_ids,
            positions=inputs.positions,
            slot_mapping=inputs.slot_mapping,
            query_lens=[s.num_tokens for s in scheduled],
            context_lens=[s.seq.num_computed_tokens + s.num_tokens for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            rope_seq_lens=_rope_seq_lens(scheduled, self.model.config, self.device),
            sample_at=inputs.sample_at,
        )
        if self._tp is None:
            logits = self._execute(step)
        else:  # every rank runs this forward: send them its inputs first
            self._tp.broadcast_step(step)
            with self._tp.guard():
                logits = self._execute(step)
        if not sampled:
            return set()
        seqs = [s.seq for s in sampled]
        reqs = [self._requests[seq.request_id] for seq in seqs]
        index = [r.seqs.index(seq) if len(r.seqs) > 1 else 0 for r, seq in zip(reqs, seqs, strict=True)]
        draws = self._sample(logits, inputs.sampled_rows, reqs, index)
        finished: set[int] = set()
        kept_rows: list[int] = []
        kept_tokens: list[int] = []
        for seq, req, i, row, draw in zip(seqs, reqs, index, inputs.sampled_rows, draws, strict=True):
            if req.error is not None:  # a sibling sample failed this step: the request is over
                continue
            touched[req.request_id] = req
            if isinstance(draw, Exception):
                self._fail(req, f"sampling failed: {type(draw).__name__}: {draw}", draw)
                continue
            try:
                done = self._append(seq, req, i, draw)
            except Exception as exc:  # this request's failure (its detokenizer, say), not the batch's
                self._fail(req, f"processing a sampled token failed: {type(exc).__name__}: {exc}", exc)
                continue
            if done:
                finished.add(seq.seq_id)
            else:  # a finishing row leaves the batch now: only the others' history matters
                kept_rows.append(row)
                kept_tokens.append(draw.token_id)
        batch.record(kept_rows, kept_tokens)
        return finished

    def _execute(self, step: ModelStep) -> torch.Tensor:
        """One forward over a step's flattened batch, with this rank's paged KV cache; the logits."""
        attn: PagedAttention | KernelPagedAttention
        if self._kernel_attention is None:
            assert self.cache is not None
            attn = PagedAttention(self.cache, step.slot_mapping, step.query_lens, step.context_lens,
                                  step.block_tables, window_sizes=self._windows)  # fmt: skip
        else:
            attn = KernelPagedAttention(self.kv, self.config.block_size, step.slot_mapping,
                                        step.query_lens, step.context_lens, step.block_tables,
                                        self._kernel_attention)  # fmt: skip
        logits: torch.Tensor = self.model(
            step.token_ids[None],
            step.positions[None],
            attn,
            rope_seq_lens=step.rope_seq_lens,
            logits_indices=step.sample_at,
        )
        return logits

    def _join(self, seq: Sequence, touched: dict[str, _Request]) -> None:
        """Give a sequence scheduled for the first time its row; fail its request if it cannot join.

        Its parameters are read only here, once for its whole life: one that cannot be turned into
        tensors (a field set to a wrong type after the checks) fails its request alone.
        """
        req = self._requests[seq.request_id]
        i = req.seqs.index(seq)
        try:
            self.input_batch.add(seq, req.params, req.generators[i])
        except Exception as exc:
            self._fail(req, f"sampling failed: {type(exc).__name__}: {exc}", exc)
            touched[req.request_id] = req

    def _sample(
        self, logits: torch.Tensor, rows: list[int], reqs: list[_Request], index: list[int]
    ) -> Seq[_Row | Exception]:
        """One token per sampled row; a row that cannot be sampled gets its exception instead."""
        generators = [r.generators[i] for r, i in zip(reqs, index, strict=True)]
        matchers = [r.matchers[i] if r.matchers else None for r, i in zip(reqs, index, strict=True)]
        # Seeded rows' generator states, to redraw exactly the same numbers if the batch fails
        # half-way; a few microseconds a seeded row, against a draw over the whole vocabulary.
        states = [g.get_state() if g is not None else None for g in generators]
        try:
            return self._sample_rows(logits, rows, matchers)
        except Exception:
            logger.warning(
                "sampling %d rows together failed; sampling them one by one", len(rows), exc_info=True
            )
        draws: list[_Row | Exception] = []
        for r, (g, state) in enumerate(zip(generators, states, strict=True)):
            if g is not None and state is not None:
                g.set_state(state)
            try:
                draws.extend(self._sample_rows(logits[r : r + 1], rows[r : r + 1], matchers[r : r + 1]))
            except Exception as exc:
                draws.append(exc)
        return draws

    def _sample_rows(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> list[_Row]:
        guided = [(row, m) for row, m in enumerate(matchers) if m is not None]
        allowed = None
        if guided:
            mask = self.guided.allowed(guided, self.device)
            if not bool(mask.any(dim=1).all()):
                raise InferError("the constraint allows no token of the model's vocabulary here")
            allowed = ([row for row, _ in guided], mask)
        tensors = self.input_batch.sampling.tensors(rows, allowed=allowed)
        out = self.sampler(logits, tensors)
        tokens = out.token_ids.tolist()
        # No row asked for log-probs: the sampler skipped them, and _append reads none.
        chosen = out.logprobs.tolist() if out.logprobs is not None else [math.nan] * len(tokens)
        if out.top_logprobs is None:
            return [_Row(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
        values, ids = out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist()
        return [_Row(*row) for row in zip(tokens, chosen, values, ids, strict=True)]

    def _append(self, seq: Sequence, req: _Request, i: int, row: _Row) -> bool:
        """Append a sampled token to sample ``i`` of ``req``; returns whether the sample finished."""
        token = row.token_id
        matcher = req.matchers[i] if req.matchers else None
        if matcher is not None and token not in self.eos_token_ids and not matcher.consume_token(token):
            raise InferError(f"the constraint rejected sampled token {token}: {matcher.get_error()}")
        seq.output_token_ids.append(token)  # the completion's token_ids too: the same list
        completion = req.outputs[i]
        if req.params.logprobs is not None:
            entry = {token: row.logprob}
            if row.top_values is not None and row.top_ids is not None:
                for lp, tid in itertools.islice(
                    zip(row.top_values, row.top_ids, strict=True), req.params.logprobs
                ):
                    entry.setdefault(tid, lp)
            assert completion.logprobs is not None and completion.cumulative_logprob is not None
            completion.logprobs.append(entry)
            completion.cumulative_logprob += row.logprob
        # The detokenizer keeps the text as pieces; _output joins them once per output.
        detok = req.detoks[i]
        detok.push(token)
        if detok.stopped:  # eos, a stop token id or a stop string
            seq.status = SequenceStatus.FINISHED_STOPPED
            completion.stop_reason = detok.stop_reason
        elif matcher is not None and matcher.is_stopped():  # the grammar is complete: nothing may follow
            seq.status = SequenceStatus.FINISHED_STOPPED
            detok.finish()
        elif seq.num_tokens >= seq.max_total_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH
            detok.finish()
        if not seq.is_finished:
            return False
        completion.finish_reason = _FINISH_REASONS[seq.status]
        return True

    def _fail(self, req: _Request, error: str, exc: Exception | None = None) -> None:
        """Finish ``req`` with ``error``: its unfinished samples stop and their KV blocks are freed."""
        if exc is not None:
            logger.error("request %s failed: %s", req.request_id, error, exc_info=exc)
        req.error = error
        for seq in self.scheduler.abort(req.request_id):
            seq.status = SequenceStatus.FINISHED_ERROR
            seq.error = error
        for seq in req.seqs:  # those the scheduler no longer held (failed by it) too
            self.input_batch.remove(seq)

    def _output(self, req: _Request) -> RequestOutput:
        if req.error is not None:
            for completion in req.outputs:
                completion.finish_reason = completion.finish_reason or "error"
        for seq, completion, detok in zip(req.seqs, req.outputs, req.detoks, strict=True):
            if seq.is_finished and completion.finish_reason is None:
                completion.finish_reason = _FINISH_REASONS[seq.status]
            completion.text = detok.text
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=req.outputs,
            finished=req.finished,
            error=req.error,
            num_cached_tokens=max((s.num_cached_prompt_tokens for s in req.seqs), default=0),
        )

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine cannot step afterwards); idempotent."""
        if self._tp is not None:
            self._tp.close()

    # -- introspection -----------------------------------------------------------------------------
    @property
    def tensor_parallel(self) -> TensorParallelGroup | None:
        """Rank 0's handle on the tensor-parallel workers, or None (one process)."""
        return self._tp

    @property
    def num_free_blocks(self) -> int:
        """KV blocks free now (cached-but-unreferenced prefix blocks count as free)."""
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        """KV blocks in the cache."""
        return self.block_manager.num_blocks


# -- per-request long context --------------------------------------------------------------------------
_KV_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kv_cache_kind(
    value: torch.dtype | str | None, model_dtype: torch.dtype
) -> tuple[torch.dtype, int | None]:
    """``(storage dtype, bits)`` of a KV-cache setting: bits is 8 or 4 for a quantized cache, else None."""
    if value is None or value == "auto":
        return model_dtype, None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(
                f"EngineConfig.kv_cache_dtype {value} is not a float dtype; use a float dtype, 'int8' "
                "or 'int4'.",
                field="kv_cache_dtype",
            )
        return value, None
    name = str(value).lower().removeprefix("torch.")
    if name in ("int8", "int4"):
        return torch.uint8, int(name[3:])
    if name in _KV_FLOAT_DTYPES:
        return _KV_FLOAT_DTYPES[name], None
    raise ConfigError(
        f"unknown kv_cache_dtype {value!r}; use 'auto', 'float32', 'float16', 'bfloat16', 'int8' or 'int4'.",
        field="kv_cache_dtype",
    )


def _rope_context_limit(config: ModelConfig) -> int | None:
    """The longest sequence the model's RoPE is defined for; None when it has no fixed end."""
    max_pos = config.max_position_embeddings
    rs = config.rope_scaling
    if rs is None:
        return max_pos
    if rs.rope_type == "dynamic":
        # NTK-aware scaling recomputes the base from each sequence's own length, so it has no end of its
        # own (InternLM2.5 runs 1M tokens this way); how far quality holds is the model's business.
        return None
    if rs.rope_type in ("linear", "yarn"):
        # Both stretch the original context by `factor` (all frequencies, or the low ones): past
        # original x factor the angles leave the trained range again.
        original = rs.original_max_position_embeddings or max_pos
        return max(max_pos, int(original * rs.factor))
    # llama3 (and anything else): checkpoints already give the extended context as
    # max_position_embeddings (Llama 3.1: 131072 = 16 x its 8192 original, factor 8).
    return max_pos


def _check_context(config: ModelConfig, max_model_len: int) -> None:
    """Refuse a ``max_model_len`` the model's RoPE does not cover."""
    limit = _rope_context_limit(config)
    if limit is None or max_model_len <= limit:
        return
    rs = config.rope_scaling
    max_pos = config.max_position_embeddings
    if rs is None:
        how = (
            f"the model has no RoPE scaling, so its context ends at max_position_embeddings ({max_pos}); "
            "lower max_model_len, or give the model a rope_scaling that extends it (dynamic, linear, yarn)"
        )
    else:
        how = (
            f"{rs.rope_type} RoPE scaling (factor {rs.factor:g}) with max_position_embeddings {max_pos} "
            f"covers {limit} tokens; lower max_model_len to at most {limit}"
        )
    raise ConfigError(f"max_model_len {max_model_len} is beyond what the model supports: {how}.",
                      field="max_model_len")  # fmt: skip


def _cache_salt(config: ModelConfig, num_prompt: int) -> int | None:
    """The prefix-cache salt of a sequence with a ``num_prompt``-token prompt (None: no salt).

    Dynamic NTK past the trained context rotates every prompt token with a base set by the whole
    prompt's length (see :func:`_rope_seq_lens`), so a prefix's K/V are shared only between prompts of
    the same length. Within the trained context the base never changes, and the tokens alone decide.
    """
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "dynamic" and num_prompt > config.max_position_embeddings:
        return num_prompt
    return None


def _rope_seq_lens(
    scheduled: Seq[ScheduledSeq], config: ModelConfig, device: torch.device
) -> torch.Tensor | None:
    """Dynamic NTK only: the sequence length that sets each step token's RoPE base (``[1, N]``).

    The lengths reproduce transformers' ``generate`` on the request alone: its dynamic RoPE takes the
    base from each forward call's longest position, and ``generate`` runs the whole prompt in one call
    and then one call per new token. So token ``p`` of a sequence with a ``P``-token prompt uses
    ``max(P, p + 1)``, whichever chunk, prefix-cache hit or recompute after preemption brings it here.
    None (plain RoPE for every token, no per-token work) when no token reaches past the trained context.
    """
    rs = config.rope_scaling
    if rs is None or rs.rope_type != "dynamic":
        return None
    spans = []
    longest = 0
    for item in scheduled:
        start = item.seq.num_computed_tokens
        end, prompt = start + item.num_tokens, len(item.seq.prompt_token_ids)
        spans.append((start, end, prompt))
        longest = max(longest, end, prompt)
    if longest <= config.max_position_embeddings:
        return None
    lens: list[int] = []
    for start, end, prompt in spans:
        split = min(max(prompt, start), end)  # tokens before it are prompt tokens, after it generated ones
        lens.extend(itertools.repeat(prompt, split - start))
        lens.extend(range(split + 1, end + 1))
    return torch.tensor([lens], device=device)
