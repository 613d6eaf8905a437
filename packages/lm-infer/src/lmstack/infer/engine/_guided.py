"""Guided decoding: JSON schemas, regular expressions, choices and grammars as token masks.

A request's constraint (one of ``SamplingParams.guided_*``) is compiled by llguidance into a matcher: a
parser over the tokenizer's vocabulary that says, at every step, which tokens may come next. llguidance
was chosen over xgrammar by measurement on the 2-core CPU machine (``benchmarks/test_guided.py`` keeps
the figures): comparable per-token mask time, faster compilation of our JSON schemas, a tokenizer built
straight from ``tokenizer.json`` (no ``transformers`` at run time), and errors returned as messages
rather than crashes.

* **Compiled once per distinct constraint.** :class:`GrammarCache` keys a constraint by its kind and
  canonical text (plus the token budget for JSON, see below) and keeps one pristine matcher per key in an
  LRU; each sequence gets a ``deep_copy`` of it (a few microseconds). Compilation runs in a worker
  thread, never inside an engine step: the engine admits a request to the scheduler only once its
  matcher is ready, and a constraint that fails to compile fails that request alone.
* **Masks in the batched sampler.** Each step, :meth:`GrammarCache.allowed` fills the token bitmask of
  every constrained row in one call (llguidance's thread pool), and the sampler sets the logits of the
  tokens a row may not take to ``-inf`` before penalties' results are used for sampling and log-probs.
  Unconstrained rows are untouched, and a batch without constrained rows does no work at all.
* **Where the output may end.** The end-of-sequence token is allowed only where the grammar accepts,
  and a sequence finishes as soon as its grammar can take nothing more.
* **JSON.** Compiled with compact separators and no free whitespace (a model cannot pad its output
  with endless blanks). With ``guided_json_fit``,
  :func:`~lmstack.infer.engine._json_budget.bound_schema` first tightens unbounded strings, arrays,
  numbers and free-form objects so that every output the grammar allows is at most the request's
  token budget: the output always completes, even from a random-weight model, and still validates
  against the schema as given.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import torch

from lmstack.core import Tokenizer
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import SamplingParams

__all__ = ["GrammarCache", "constraint_key"]

logger = logging.getLogger(__name__)

_BITS = torch.arange(32, dtype=torch.int32)
# JSON without guided_json_fit: compact separators and no free whitespace (a model cannot pad its
# output with endless blanks), a user schema's own whitespace setting overridden, and oneOf taken as
# anyOf (llguidance cannot prove many real unions' branches disjoint, e.g. numeric discriminators).
_JSON_OPTIONS = {
    "item_separator": ",",
    "key_separator": ":",
    "whitespace_flexible": False,
    "whitespace_pattern": None,
    "coerce_one_of": True,
}


def constraint_key(params: SamplingParams, budget: int | None = None) -> tuple[str, str, int | None] | None:
    """The cache key of a request's constraint, or None when it has none.

    JSON schemas are keyed by their compact JSON text, and with ``guided_json_fit`` by the token
    budget too (the bounded schema depends on it); otherwise the budget is ignored, so requests
    differing only in ``max_tokens`` share one compiled matcher.

    Args:
        params: The request's sampling parameters.
        budget: Most tokens the request may generate (default: ``params.max_tokens``).
    """
    kind = params.guided_kind
    if kind is None:
        return None
    value = getattr(params, kind)
    if kind == "guided_json":
        limit = (params.max_tokens if budget is None else budget) if params.guided_json_fit else None
        # Key order is kept: the grammar emits properties in the schema's order, so two orders are
        # two different constraints.
        return kind, json.dumps(value, separators=(",", ":")), limit
    if kind == "guided_choice":
        return kind, json.dumps(value), None
    return kind, str(value), None


def _grammar(kind: str, spec: str, budget: int | None) -> str:
    """The llguidance grammar text of one constraint (not yet checked)."""
    if kind == "guided_json":
        from lmstack.infer.engine._json_budget import JSON_COMPILE_OPTIONS, bound_schema

        schema = json.loads(spec)
        if budget is None:
            options: Any = _JSON_OPTIONS
        else:
            options = JSON_COMPILE_OPTIONS
            bounded = bound_schema(schema, budget)
            if bounded is None:
                logger.debug(
                    "guided_json: cannot bound this schema to %d tokens; compiling it as given", budget
                )
            else:
                schema = bounded
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options))
    if kind == "guided_regex":
        return str(llguidance.LLMatcher.grammar_from_regex(spec))
    if kind == "guided_choice":
        return str(llguidance.grammar_from("choice", spec))
    try:  # guided_grammar: Lark as is, GBNF converted
        return str(llguidance.grammar_from("grammar", spec))
    except ValueError as exc:
        raise InvalidRequestError(f"guided_grammar: {exc}", param=kind) from None


class GrammarCache:
    """Compiles constraints off the hot path, caches them, and masks a batch's logits.

    Thread-safe: the server compiles in worker threads (:meth:`compile`) while the engine thread
    admits requests (:meth:`submit`) and masks its batches (:meth:`allowed`).

    Args:
        tokenizer: The model's tokenizer (its ``tokenizer.json`` becomes llguidance's tokenizer).
        vocab_size: Width of the model's logits (may exceed the tokenizer's vocabulary).
        eos_token_ids: The model's end-of-sequence ids: allowed exactly where a grammar accepts.
        max_entries: Distinct constraints kept compiled (least recently used dropped first).
    """

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], max_entries: int = 256
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, int | None], concurrent.futures.Future[Any]] = (
            OrderedDict()
        )
        self._lltokenizer: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor: Any = None
        self.hits = 0
        self.misses = 0

    # -- compiling ---------------------------------------------------------------------------------
    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                backend = self._tokenizer.backend_tokenizer
                n_vocab = max(self.vocab_size, backend.get_vocab_size(with_added_tokens=True))
                eos = self._eos or (
                    [self._tokenizer.eos_token_id] if self._tokenizer.eos_token_id is not None else []
                )
                self._lltokenizer = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=n_vocab, eos_token=eos or None
                )
            return self._lltokenizer

    def _compile(self, key: tuple[str, str, int | None]) -> Any:
        """Build the pristine matcher of ``key``; raises InvalidRequestError with the library's message."""
        kind, spec, budget = key
        tokenizer = self._llg_tokenizer()
        grammar = _grammar(kind, spec, budget)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            detail = messages[0].strip() if messages else "unknown error"
            raise InvalidRequestError(f"{kind} cannot be compiled: {detail}", param=kind)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{kind} cannot be compiled: {matcher.get_error()}", param=kind)
        return matcher

    def submit(self, params: SamplingParams, budget: int | None = None) -> concurrent.futures.Future[Any]:
        """The compiled matcher of ``params``' constraint, as a future (done at once on a cache hit).

        Compilation runs in a worker thread; its exception (an :class:`InvalidRequestError`) is the
        future's. A failed compilation is cached too: the same constraint fails the same way.

        Args:
            params: The request's sampling parameters (with a ``guided_*`` constraint).
            budget: Most tokens the request may generate (default: ``params.max_tokens``).
        """
        key = constraint_key(params, budget)
        if key is None:
            raise ValueError("submit() needs a request with a guided_* constraint")
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmstack-grammar")
            future = self._pool.submit(self._compile, key)
            self._entries[key] = future
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return future

    def compile(
        self, params: SamplingParams, budget: int | None = None, timeout: float | None = None
    ) -> None:
        """Compile ``params``' constraint now (or find it compiled), waiting for the worker thread.

        Args:
            params: The request's sampling parameters.
            budget: Most tokens the request may generate (default: ``params.max_tokens``).
            timeout: Most seconds to wait (default: no limit).

        Raises:
            InvalidRequestError: The constraint cannot be compiled; ``param`` names its field.
        """
        if params.guided_kind is None:
            return
        self.submit(params, budget).result(timeout)

    def new_matcher(self, compiled: Any) -> Any:
        """A fresh matcher for one sequence, copied from a compiled (never advanced) one."""
        with self._lock:  # the pristine matcher is shared: copy it under the lock
            return compiled.deep_copy()

    # -- masking -----------------------------------------------------------------------------------
    def allowed(self, matchers: Sequence[tuple[int, Any]], device: torch.device | str) -> torch.Tensor:
        """The tokens each constrained row may take next, as a ``[len(matchers), vocab_size]`` bool mask.

        Args:
            matchers: ``(row, matcher)`` pairs; the mask's row ``k`` belongs to ``matchers[k]``.
            device: Device of the logits.

        Raises:
            InvalidRequestError: A matcher is in an error state (its message says why).
        """
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=None)
        words = (self._llg_tokenizer().vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        # Straight to the executor: llguidance.torch's wrapper would import torch.compile's stack (seconds).
        self._executor.unsafe_compute_mask_ptr(
            [(m, k) for k, (_, m) in enumerate(matchers)], bitmask.data_ptr(), words * 4, len(matchers)
        )
        for _, matcher in matchers:
            if matcher.is_error():
                raise InvalidRequestError(f"the constraint failed: {matcher.get_error()}")
        bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].to(device=device, dtype=torch.bool)
