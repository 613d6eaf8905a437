"""A transformers model behind the part of the LLM protocol the evaluation runner uses: a reference.

:class:`TransformersLLM` loads a checkpoint directory with ``transformers.AutoModelForCausalLM`` and
answers ``loglikelihood``, ``loglikelihood_rolling``, ``generate`` and ``chat`` (greedy only) with
transformers' own forward pass, log-softmax and ``generate``. Evaluating it and an
:class:`lmstack.infer.LLM` on the same directory checks lmstack's engine against an independent
implementation. Inputs are tokenized exactly as ``LLM`` tokenizes them (the same helpers split
context and continuation and cut rolling windows), so only the model arithmetic differs.

transformers is not a dependency of lmstack-eval; it is imported when a model is built.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from lmstack.core import Tokenizer
from lmstack.eval._errors import EvalError
from lmstack.infer import CompletionOutput, InvalidRequestError, RequestOutput, SamplingParams
from lmstack.infer.engine import LLMEngine
from lmstack.infer.protocol import (
    IncrementalDetokenizer,
    as_batch,
    as_conversations,
    as_params,
    check_max_length,
    check_token_ids,
    is_conversation,
    plan_rolling,
    rolling_token_lists,
    split_pair,
    sum_rolling,
)

__all__ = ["TransformersLLM"]


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise EvalError(
            "TransformersLLM needs transformers, which lmstack-eval does not install: "
            "pip install transformers"
        ) from err
    return transformers


class TransformersLLM:
    """A Hugging Face transformers model that the evaluation runner can evaluate, for reference.

    It implements :class:`lmstack.infer.LLMProtocol` (``tokenizer``, ``loglikelihood``,
    ``loglikelihood_rolling``, ``generate``, ``chat``; ``stream`` yields the finished completion
    once) and ``max_model_len``. Generation is
    greedy only (``temperature=0``), one completion per prompt; stop strings, stop token ids and
    ``max_tokens`` act as in :class:`lmstack.infer.LLM`.

    Args:
        path: A Hugging Face checkpoint directory (config, safetensors weights, tokenizer).
        dtype: The dtype transformers loads the weights in.
        device: Where the model runs.
        batch_size: Sequences per forward pass or ``generate`` call.

    Raises:
        EvalError: transformers is not installed, or ``batch_size`` is below 1.

    Example:
        >>> from lmstack.eval import TransformersLLM, evaluate  # doctest: +SKIP
        >>> evaluate(TransformersLLM("out/quickstart/tiny-model"), "tasks/toy.yaml")  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {batch_size}")
        transformers = _import_transformers()
        self.path = Path(path)
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        self.model.to(self.device).eval()
        self._tokenizer = Tokenizer.from_pretrained(self.path)
        config = self.model.config
        self.vocab_size: int = int(config.vocab_size)
        self._max_model_len = int(config.max_position_embeddings)
        # The engine's end-of-sequence ids: the model config's, else the tokenizer's.
        eos = config.eos_token_id if config.eos_token_id is not None else self._tokenizer.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos_token_ids = sorted({int(t) for t in eos_ids if 0 <= t < self.vocab_size})
        pad = self._tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (lmstack's, loaded from the same directory)."""
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """The longest sequence the model takes (its ``max_position_embeddings``)."""
        return self._max_model_len

    # -- scoring -----------------------------------------------------------------------------------------
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]] | Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation given its context, and whether greedy agrees.

        Pairs are tokenized as :meth:`lmstack.infer.LLM.loglikelihood` tokenizes them.

        Raises:
            InvalidRequestError: A malformed pair (as ``LLM`` raises it).
        """
        # split_pair reads only tokenizer, vocab_size and max_model_len, which this class has.
        engine = cast(LLMEngine, self)
        return self._score([split_pair(engine, ctx, cont) for ctx, cont in requests])

    def loglikelihood_rolling(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        use_tqdm: bool | None = None,
    ) -> list[float]:
        """Summed log-probability of each whole text, in the rolling windows ``LLM`` uses.

        Args:
            texts: Texts, or token-id lists.
            max_length: Most tokens the model sees in one window (default: :attr:`max_model_len`).
            use_tqdm: Accepted for the protocol; no progress bar is drawn.

        Raises:
            InvalidRequestError: ``max_length`` below 2 or above :attr:`max_model_len`, or a bad item.
        """
        length = check_max_length(max_length, self._max_model_len) or self._max_model_len
        token_lists = rolling_token_lists(texts, self._tokenizer, self.vocab_size)
        pairs, owners = plan_rolling(token_lists, self._tokenizer, length)
        scores = self._score(pairs)
        return sum_rolling(len(token_lists), owners, [logprob for logprob, _ in scores])

    @torch.inference_mode()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        # Longest first, so a batch pads little; each row is context + continuation minus its last
        # token (which predicts nothing we need), right-padded and masked.
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, i in enumerate(batch):
                ctx, cont = pairs[i]
                at = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))
                target = torch.tensor(cont, device=self.device)
                chosen = logprobs[r, at].gather(-1, target[:, None])[:, 0].double()
                greedy = bool((logits[r, at].argmax(-1) == target).all())
                results[i] = (float(chosen.sum().float()), greedy)
        return results

    # -- generation --------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Greedy completions of each prompt (text is encoded with special tokens, as ``LLM`` does).

        Raises:
            InvalidRequestError: A bad prompt, a prompt that fills the context, or sampling parameters
                other than greedy decoding (``temperature`` not 0, ``n`` above 1, penalties, logprobs,
                ``min_tokens``, ``ignore_eos``).
        """
        batch = as_batch(prompts)
        params = as_params(sampling_params, len(batch))
        prompt_ids = []
        for prompt, p in zip(batch, params, strict=True):
            _check_greedy(p)
            ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            ids = check_token_ids(ids, self.vocab_size)
            if len(ids) >= self._max_model_len:
                raise InvalidRequestError(
                    f"the prompt has {len(ids)} tokens and the model's context is {self._max_model_len}: "
                    "no room left to generate.",
                    param="prompt",
                )
            prompt_ids.append(ids)
        outputs: list[RequestOutput | None] = [None] * len(batch)
        order = sorted(range(len(batch)), key=lambda i: -len(prompt_ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            generated = self._greedy([prompt_ids[i] for i in chunk], [params[i] for i in chunk])
            for i, tokens in zip(chunk, generated, strict=True):
                prompt = batch[i]
                outputs[i] = RequestOutput(
                    request_id=f"ref-{i}",
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=prompt_ids[i],
                    outputs=[self._completion(prompt_ids[i], tokens, params[i])],
                    finished=True,
                )
        return [out for out in outputs if out is not None]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Greedy replies to one conversation or a list of them, through the model's chat template.

        Raises:
            InvalidRequestError: ``tools``, ``tool_choice`` or a JSON ``response_format`` was given: the
                reference answers in plain text only (use :class:`lmstack.infer.LLM` for those).
        """
        asked = {"tools": tools, "tool_choice": tool_choice}
        if response_format is not None and response_format.get("type") != "text":
            asked["response_format"] = response_format
        for name, value in asked.items():
            if value is not None:
                raise InvalidRequestError(
                    f"TransformersLLM answers in plain text only: {name} is not supported; use "
                    "lmstack.infer.LLM for tools and JSON replies.",
                    param=name,
                )
        prompts: list[Sequence[int]] = []
        for conversation in as_conversations(messages):
            text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
            prompts.append(self._tokenizer.encode(str(text), add_special_tokens=False))
        return self.generate(prompts, sampling_params)

    async def stream(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, Any]],
        sampling_params: SamplingParams | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The protocol's stream, without streaming: the whole greedy completion as one final output."""
        if is_conversation(prompt):
            out = self.chat(cast(Sequence[Mapping[str, Any]], prompt), sampling_params)
        else:
            out = self.generate(cast("str | Sequence[int]", prompt), sampling_params)
        yield out[0]

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        """Transformers' greedy ``generate`` over left-padded prompts; the new tokens of each."""
        transformers = _import_transformers()
        limits = [
            self._max_model_len - len(ids) if p.max_tokens is None else p.max_tokens
            for ids, p in zip(prompts, params, strict=True)
        ]
        limits = [min(n, self._max_model_len - len(ids)) for n, ids in zip(limits, prompts, strict=True)]
        width = max(len(ids) for ids in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, row in enumerate(prompts):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        # A fresh config: the checkpoint's generation_config.json must not add sampling or penalties.
        config = transformers.GenerationConfig(
            max_new_tokens=max(limits), do_sample=False, eos_token_id=self.eos_token_ids or None,
            pad_token_id=self._pad_id,
        )  # fmt: skip
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=config
        )
        # Greedy decoding is causal: a row's first n tokens do not depend on how far the batch ran.
        return [out[r, width : width + limits[r]].tolist() for r in range(len(prompts))]

    def _completion(
        self, prompt_ids: list[int], tokens: list[int], params: SamplingParams
    ) -> CompletionOutput:
        # The engine's own detokenizer applies stop strings / stop ids / eos, so text matches LLM's.
        detok = IncrementalDetokenizer(self._tokenizer, prompt_ids, params, eos_token_ids=self.eos_token_ids)
        for token in tokens:
            detok.push(token)
            if detok.done:
                break
        detok.finish()
        return CompletionOutput(
            index=0,
            text=detok.text,
            token_ids=tokens[: detok.num_tokens],
            finish_reason="stop" if detok.stopped else "length",
            stop_reason=detok.stop_reason,
        )


def _check_greedy(params: SamplingParams) -> None:
    unsupported = {
        "temperature": params.temperature != 0,
        "n": params.n != 1,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "logprobs": params.logprobs is not None,
        "min_tokens": params.min_tokens != 0,
        "ignore_eos": params.ignore_eos,
        # Constrained decoding needs lmstack's engine (its grammar masks); the reference has none.
        "guided_json": params.guided_json is not None,
        "guided_regex": params.guided_regex is not None,
        "guided_choice": params.guided_choice is not None,
        "guided_grammar": params.guided_grammar is not None,
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise InvalidRequestError(
            f"TransformersLLM decodes greedily only (temperature=0, n=1, no penalties, logprobs, "
            f"min_tokens, ignore_eos or guided_* constraints); got "
            f"{', '.join(f'{b}={getattr(params, b)!r}' for b in bad)}."
        )
