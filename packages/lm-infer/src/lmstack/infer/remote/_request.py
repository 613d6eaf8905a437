"""Request building: lmstack's :class:`~lmstack.infer.SamplingParams` as OpenAI request fields."""

from __future__ import annotations

from typing import Any

from lmstack.infer._sampling_params import SamplingParams

__all__ = ["sampling_fields"]


def sampling_fields(params: SamplingParams, *, chat: bool) -> dict[str, Any]:
    """The request fields for ``params``.

    OpenAI's own fields are always sent where they mean something; vLLM's extensions (``top_k``,
    ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
    ``skip_special_tokens``, ``include_stop_str_in_output``) only when they differ from the default,
    so a plain OpenAI server, which rejects unknown fields, sees none of them. A ``guided_*``
    constraint is sent as vLLM's field of the same name (lmstack serve, vLLM and SGLang take them).
    """
    body: dict[str, Any] = {"n": params.n, "temperature": params.temperature, "top_p": params.top_p}
    if params.max_tokens is not None or not chat:
        # null asks for the server's default: on /v1/completions vLLM generates up to the context,
        # OpenAI and lmstack serve 16 tokens; left out of a chat request, every server goes to the context.
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.logprobs is not None:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        else:
            body["logprobs"] = params.logprobs
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.min_p:
        body["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.min_tokens:
        body["min_tokens"] = params.min_tokens
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.ignore_eos:
        body["ignore_eos"] = True
    if not params.skip_special_tokens:
        body["skip_special_tokens"] = False
    if params.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    kind = params.guided_kind
    if kind is not None:
        body[kind] = getattr(params, kind)
    if params.guided_json_fit is not None:
        body["guided_json_fit"] = params.guided_json_fit
    return body
