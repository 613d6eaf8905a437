"""The LLM protocol: the one interface lmstack-eval, lmstack-agent and lmstack-rag talk to.

Two implementations satisfy it: the local engine (:class:`~lmstack.infer.LLM`) and the remote client
for any OpenAI-compatible server (:class:`~lmstack.infer.RemoteLLM`). Code above this layer takes an
``LLMProtocol`` and never knows which one it holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lmstack.core import Tokenizer
from lmstack.infer._outputs import RequestOutput
from lmstack.infer._sampling_params import SamplingParams

__all__ = ["LLMProtocol"]


@runtime_checkable
class LLMProtocol(Protocol):
    """Generate, chat, stream and score with a language model.

    Prompts are text or token ids; conversations are lists of ``{"role": ..., "content": ...}``.
    """

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        ...

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in the prompts' order."""
        ...

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or each of a list of them, through the model's chat template.

        Messages are OpenAI chat messages: besides ``role`` and ``content``, an assistant message may
        carry ``tool_calls`` and a ``tool`` message answers one with its ``tool_call_id``.

        Args:
            messages: One conversation, or a list of them.
            sampling_params: One set for all conversations, or one per conversation.
            tools: OpenAI function tools (``{"type": "function", "function": {"name", "parameters"}}``)
                the model may call; the chat template renders them. With tools, every output's
                ``tool_calls`` is a list (empty when the reply made no call) and its ``text`` holds
                only the reply's content outside the calls.
            tool_choice: ``"none"``, ``"auto"`` (the default with tools), ``"required"``, or
                ``{"type": "function", "function": {"name": ...}}`` to force that function.
            response_format: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
                "json_schema", "json_schema": {"name", "schema", "strict"}}``: the reply is JSON
                (valid under the schema) when it is not cut short by ``max_tokens``.
        """
        ...

    def stream(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, Any]],
        sampling_params: SamplingParams | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield one request's progress as deltas (new text and tokens); closing it cancels the request."""
        ...

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]] | Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """For each ``(context, continuation)``: summed log-probability of the continuation, and is-greedy."""
        ...

    def loglikelihood_rolling(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        use_tqdm: bool | None = None,
    ) -> list[float]:
        """For each text (or token-id list): the summed log-probability of all its tokens.

        The first token is conditioned on the bos (else eos) token; a text longer than ``max_length``
        tokens is scored in rolling windows, each conditioned on the tokens before it
        (lm-evaluation-harness's ``loglikelihood_rolling``). Used for perplexity and bits per byte.
        """
        ...
