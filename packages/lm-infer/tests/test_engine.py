"""The engine against transformers: greedy tokens, log-likelihoods; batching, caching, preemption, errors."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import ConfigError
from lmstack.infer import LLM, InferError, InvalidRequestError, SamplingParams


def _prompts(n: int, vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def hf_greedy(model_dir: Path) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def generate(prompt: list[int], max_new: int) -> list[int]:
        key = (tuple(prompt), max_new)
        if key not in cache:
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                    pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                )  # fmt: skip
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    generate.model = model  # type: ignore[attr-defined]
    return generate


ENGINE_SETUPS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked-prefill": {"max_num_batched_tokens": 16, "block_size": 4},
    # 14 blocks of 4 tokens: far too few for the batch at once, so sequences are preempted and recomputed.
    "preemption": {"num_kv_blocks": 14, "block_size": 4, "max_num_batched_tokens": 64},
    # One sequence at a time: the weights take core's "gemv" layout (its compiled one-row kernel).
    "single-sequence": {"max_num_seqs": 1},
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_equals_transformers(model_dir: Path, hf_greedy: Any, setup: str) -> None:
    llm = LLM(model_dir, **ENGINE_SETUPS[setup])
    vocab = llm.engine.vocab_size
    prompts = _prompts(10, vocab, seed=1) + _prompts(4, vocab, seed=2, shared_prefix=13)
    max_new = [random.Random(i).randint(4, 24) for i in range(len(prompts))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_new]
    outputs = llm.generate(prompts, params)
    assert (llm.engine.model.inference_layout == "gemv") == (setup == "single-sequence")
    for prompt, m, out in zip(prompts, max_new, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(prompt, m), (setup, prompt)
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.num_free_blocks == llm.engine.num_blocks  # no leaks
    assert not llm.engine.scheduler.has_unfinished


def test_weight_layout_is_checked_and_can_be_forced(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="weight_layout must be"):
        LLM(model_dir, weight_layout="packed")
    llm = LLM(model_dir, weight_layout="gemv")  # many sequences, one-row kernel all the same
    assert llm.engine.model.inference_layout == "gemv"
    llm = LLM(model_dir, max_num_seqs=1, weight_layout="onednn")  # an explicit choice wins over auto
    assert llm.engine.model.inference_layout == "onednn"


def test_preemption_really_happens(model_dir: Path) -> None:
    llm = LLM(model_dir, **ENGINE_SETUPS["preemption"])
    for p in _prompts(8, llm.engine.vocab_size, seed=3):
        llm.engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    preempted = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        preempted = max(
            preempted, sum(s.num_preemptions for r in llm.engine._requests.values() for s in r.seqs)
        )
    assert preempted > 0
    assert llm.engine.num_free_blocks == llm.engine.num_blocks


def test_prefix_cache_serves_shared_prompts(model_dir: Path, hf_greedy: Any) -> None:
    llm = LLM(model_dir, block_size=4)
    prompts = _prompts(3, llm.engine.vocab_size, seed=5, shared_prefix=20)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts[:1], params)
    rest = llm.generate(prompts[1:], params)
    assert all(out.num_cached_tokens >= 20 for out in rest)
    for prompt, out in zip(prompts, first + rest, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(prompt, 6)


def test_loglikelihood_equals_transformers(model_dir: Path, hf_greedy: Any) -> None:
    llm = LLM(model_dir)
    rng = random.Random(7)
    vocab = llm.engine.vocab_size
    pairs = [
        (
            [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))],
            [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))],
        )
        for _ in range(12)
    ]
    greedy_prompt = pairs[0][0]
    pairs.append((greedy_prompt, hf_greedy(greedy_prompt, 5)))  # a continuation greedy decoding produces
    got = llm.loglikelihood(pairs, max_batch_tokens=64)
    model = hf_greedy.model
    for (ctx, cont), (logprob, is_greedy) in zip(pairs, got, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = model(ids).logits[0, len(ctx) - 1 : -1].double()
        reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert logprob == pytest.approx(reference, abs=1e-3)
        assert is_greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    assert got[-1][1] is True


def test_loglikelihood_text_pairs(model_dir: Path) -> None:
    llm = LLM(model_dir)
    ((lp, _),) = llm.loglikelihood([("the quick brown", " fox jumps")])
    ids = llm.tokenizer.encode("the quick brown fox jumps")
    ctx = llm.tokenizer.encode("the quick brown")
    ((lp2, _),) = llm.loglikelihood([(ctx, ids[len(ctx) :])])
    assert lp == pytest.approx(lp2) and lp < 0


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        (([5, 6], [7, 10**6]), "continuation to score holds token ids \\[1000000\\] outside the vocabulary"),
        (([5, -2], [7]), "context holds token ids \\[-2\\] outside the vocabulary"),
        (([5, 6], [7.5]), "int token ids"),
        (([5, 6], []), "continuation to score is empty"),
        (("the quick", [7]), "two strings or two token-id lists"),
    ],
)
def test_loglikelihood_refuses_bad_pairs(model_dir: Path, pair: Any, words: str) -> None:
    # Ids outside the vocabulary used to reach the embedding (an IndexError for the whole batch).
    llm = LLM(model_dir)
    with pytest.raises(InvalidRequestError, match=words):
        llm.loglikelihood([([5, 6], [7]), pair])


def test_seeded_sampling_reproducible_and_independent_of_batch(model_dir: Path) -> None:
    llm = LLM(model_dir)
    prompt = _prompts(1, llm.engine.vocab_size, seed=9)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True, n=2)
    alone = llm.generate([prompt], seeded)[0]
    others = _prompts(6, llm.engine.vocab_size, seed=10)
    mixed = llm.generate(
        [*others[:3], prompt, *others[3:]],
        [SamplingParams(temperature=0.8, max_tokens=9)] * 3
        + [seeded]
        + [SamplingParams(temperature=1.0, seed=5)] * 3,
    )[3]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # the n samples differ
    again = llm.generate([prompt], seeded)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in alone.outputs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_sampling_on_a_cuda_model(model_dir: Path) -> None:
    # A seeded request's generator must live on the logits' device: a CPU one cannot draw CUDA noise.
    llm = LLM(model_dir, device="cuda")
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=11, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded)[0]
    mixed = llm.generate([[5, 6, 7], [8, 9]], [seeded, SamplingParams(temperature=0.9, max_tokens=8)])[0]
    assert alone.error is None and len(alone.outputs[0].token_ids) == 8
    assert mixed.error is None and mixed.outputs[0].token_ids == alone.outputs[0].token_ids


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(model_dir: Path) -> None:
    llm = LLM(model_dir, max_model_len=64)
    engine = llm.engine
    good = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    refusals = [
        (lambda: engine.add_request(list(range(3, 70)), SamplingParams()), "context is 64", "prompt"),
        (lambda: engine.add_request([5, 6], SamplingParams(max_tokens=0)), "max_tokens", "max_tokens"),
        (lambda: engine.add_request([5, 6], SamplingParams(top_p=1.5)), "top_p", "top_p"),
        (lambda: engine.add_request("", SamplingParams()), "empty", "prompt"),
        (lambda: engine.add_request([], SamplingParams()), "empty", "prompt"),
        (
            lambda: engine.add_request([5, 6], SamplingParams(stop_token_ids=[10**6])),
            "stop_token_ids",
            "stop_token_ids[0]",
        ),
        (lambda: engine.add_request([5, 10**6], SamplingParams()), "outside the vocabulary", "prompt"),
        (lambda: engine.add_request([5, -1], SamplingParams()), "outside the vocabulary", "prompt"),
        (lambda: engine.add_request([5, 6.0], SamplingParams()), "int token ids", "prompt"),  # type: ignore[list-item]
        (lambda: engine.add_request([5, 6], request_id=good), "already in use", None),
    ]
    for add, words, param in refusals:
        with pytest.raises(InvalidRequestError, match=words) as info:
            add()
        assert info.value.param == param, (words, info.value.param)
    assert engine.num_requests == 1  # nothing was queued
    finished = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == good and out.finished:
                finished = out
    assert finished is not None and len(finished.outputs[0].token_ids) == 8
    assert engine.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("max_tokens", [None, 1, 100])
def test_a_prompt_filling_the_context_is_refused_for_what_it_is(
    model_dir: Path, max_tokens: int | None
) -> None:
    # The prompt alone leaves no room, whatever max_tokens says: the error blames the prompt and
    # says what was computed, never a max_tokens the caller did not send.
    engine = LLM(model_dir, max_model_len=64).engine
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(list(range(3, 67)), SamplingParams(max_tokens=max_tokens))
    message = str(info.value)
    assert info.value.param == "prompt"
    assert "the prompt has 64 tokens and the model's context is 64: no room left to generate" in message
    assert "max_tokens" not in message


def test_a_request_the_whole_cache_cannot_hold_is_refused_at_the_door(model_dir: Path) -> None:
    llm = LLM(model_dir, num_kv_blocks=6, block_size=4)  # 24 token slots
    engine = llm.engine
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(
            [[5, 6, 7], list(range(3, 20))],
            [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0, max_tokens=30)],
        )
    assert info.value.param == "max_tokens"
    assert "17 tokens" in str(info.value) and "47 tokens of KV cache" in str(info.value)
    assert "holds 24" in str(info.value)
    assert not engine.has_unfinished_requests()  # the batch was refused whole
    with pytest.raises(InvalidRequestError, match="the KV cache holds 24: no room") as info:
        engine.add_request(list(range(3, 27)), SamplingParams(max_tokens=None))
    assert info.value.param == "prompt"
    # With no max_tokens, a request generates until the whole cache is full (the context is 256).
    [out] = llm.generate(
        [list(range(3, 20))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    )
    assert out.error is None and len(out.outputs[0].token_ids) == 24 - 17
    assert out.outputs[0].finish_reason == "length"
    assert engine.num_free_blocks == engine.num_blocks


def _run_to_completion(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    """Adds every request before the first step (one batch), steps until all finish."""
    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    final: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert engine.num_free_blocks == engine.num_blocks
    return {rid: final[rid] for rid in ids}


def _good_requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    prompts = _prompts(3, vocab, seed=21)
    return [
        (prompts[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)),
        (prompts[1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=7, n=2)),
        (prompts[2], SamplingParams(temperature=0.7, top_k=20, max_tokens=9, ignore_eos=True, seed=3)),
    ]


def _samples(out: Any) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_a_request_failing_in_the_sampler_fails_alone(model_dir: Path) -> None:
    llm = LLM(model_dir)
    good = _good_requests(llm.engine.vocab_size)
    alone = list(_run_to_completion(llm, good).values())

    bad = SamplingParams(temperature=0.5, max_tokens=12, ignore_eos=True)
    requests = [good[0], (_prompts(1, llm.engine.vocab_size, seed=22)[0], bad), *good[1:]]
    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    # Fields set after construction bypass SamplingParams' checks: this one breaks only at sampling.
    bad.top_k = None  # type: ignore[assignment]
    final: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    failed = final[ids[1]]
    assert failed.error is not None and failed.error.startswith("sampling failed: TypeError")
    assert [c.finish_reason for c in failed.outputs] == ["error"] and failed.outputs[0].token_ids == []
    together = [final[rid] for rid in ids[:1] + ids[2:]]
    for out, reference in zip(together, alone, strict=True):
        assert out.error is None
        assert _samples(out) == _samples(reference)
        assert [c.finish_reason for c in out.outputs] == [c.finish_reason for c in reference.outputs]
    for got, expected in zip(together[0].outputs[0].logprobs, alone[0].outputs[0].logprobs, strict=True):
        assert got == pytest.approx(expected, abs=1e-5)
    assert engine.num_free_blocks == engine.num_blocks


def test_a_request_failing_in_detokenization_fails_alone(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(model_dir)
    good = _good_requests(llm.engine.vocab_size)
    alone = list(_run_to_completion(llm, good).values())
    # A token this tokenizer cannot decode, in no good request's prompt or output.
    seen = {t for prompt, _ in good for t in prompt} | {t for out in alone for s in _samples(out) for t in s}
    cursed = next(t for t in range(3, llm.engine.vocab_size) if t not in seen)
    decode = llm.tokenizer.decode

    def failing_decode(ids: Any, skip_special_tokens: bool = False) -> str:
        if cursed in ids:
            raise ValueError(f"no text for token {cursed}")
        return decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(llm.tokenizer, "decode", failing_decode)
    bad = ([5, 6, cursed], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    together = list(_run_to_completion(llm, [good[0], bad, *good[1:]]).values())
    failed = together.pop(1)
    assert failed.error is not None and f"no text for token {cursed}" in failed.error
    assert failed.outputs[0].finish_reason == "error"
    for out, reference in zip(together, alone, strict=True):
        assert out.error is None and _samples(out) == _samples(reference)
        assert [c.text for c in out.outputs] == [c.text for c in reference.outputs]


def test_stop_strings_and_text(model_dir: Path) -> None:
    llm = LLM(model_dir)
    base = llm.generate(["the quick"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = llm.generate(
        ["the quick"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    )
    c = cut[0].outputs[0]
    assert c.text == base.text[: base.text.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop


def test_stream_deltas_and_cancellation_frees_blocks(model_dir: Path) -> None:
    llm = LLM(model_dir)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    whole = llm.generate(["the lazy dog"], params)[0].outputs[0]

    async def consume(limit: int | None) -> tuple[str, list[int], int]:
        text, tokens, chunks = "", [], 0
        agen = llm.stream("the lazy dog", params)
        async for out in agen:
            text += out.outputs[0].text
            tokens += out.outputs[0].token_ids
            chunks += 1
            if limit is not None and chunks == limit:
                await agen.aclose()
                break
        return text, tokens, chunks

    text, tokens, chunks = asyncio.run(consume(None))
    assert (text, tokens) == (whole.text, whole.token_ids) and chunks > 1
    asyncio.run(consume(3))
    # Closing the stream queues its abort (never waited on); the engine thread applies it at its
    # next turn, without any other request to step.
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == llm.engine.num_blocks
    llm.close()


def test_chat_uses_the_template(model_dir: Path) -> None:
    llm = LLM(model_dir)
    conv = [{"role": "user", "content": "the quick brown fox"}]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    text = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 4


def test_close_ends_pending_streams_and_frees_blocks(model_dir: Path) -> None:
    llm = LLM(model_dir)

    async def main() -> Any:
        agen = llm.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        first = await agen.__anext__()
        llm.close()
        last = first
        async for out in agen:
            last = out
        return last

    last = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert last.finished and last.error == "the LLM was closed"
    assert llm.engine.num_free_blocks == llm.engine.num_blocks
    with pytest.raises(InferError, match="closed"):
        asyncio.run(llm.stream([5, 6]).__anext__())


@pytest.mark.parametrize("option", ["block_size", "max_num_seqs", "num_kv_blocks"])
def test_engine_options_must_be_positive(model_dir: Path, option: str) -> None:
    with pytest.raises(ConfigError, match=option) as info:
        LLM(model_dir, **{option: 0})
    assert info.value.field == option


def _penalised_reference(model: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding with the penalties recomputed from the whole history at every token (no cache)."""
    out: list[int] = []
    for _ in range(params.max_tokens or 0):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt + out] = True
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        rep = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("setup", ["default", "preemption"])
def test_penalties_from_running_counts_equal_a_full_recompute(
    model_dir: Path, hf_greedy: Any, setup: str
) -> None:
    """Requests join and leave at different steps and reuse each other's rows (3 at a time); the
    penalties kept as running counts give the tokens of a reference that recounts every step."""
    options = {"max_num_seqs": 3, **ENGINE_SETUPS[setup]}
    llm = LLM(model_dir, **options)
    engine = llm.engine
    vocab = engine.vocab_size
    prompts = _prompts(7, vocab, seed=31)
    kinds = [
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"repetition_penalty": 0.7, "presence_penalty": -0.5},
        {},
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=6 + 3 * (i % 4), ignore_eos=True, **kinds[i % len(kinds)])
        for i in range(len(prompts))
    ]
    ids: list[str] = []
    final: dict[str, Any] = {}
    steps = 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        if len(ids) < len(prompts) and steps % 3 == 0:  # a new request every third step
            ids.append(engine.add_request(prompts[len(ids)], params[len(ids)]))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
    assert engine.input_batch.num_rows == 0 and engine.input_batch.sampling.num_rows == 0
    assert engine.num_free_blocks == engine.num_blocks
    changed = 0
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        tokens = final[rid].outputs[0].token_ids
        assert tokens == _penalised_reference(hf_greedy.model, prompt, p), (setup, p)
        changed += tokens != hf_greedy(prompt, p.max_tokens)
    assert changed >= 3  # the penalties really steer the tokens
