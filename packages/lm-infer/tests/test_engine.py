"""The engine against transformers: greedy tokens, log-likelihoods; batching, caching, preemption, errors."""

from __future__ import annotations

import asyncio
import random
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
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_equals_transformers(model_dir: Path, hf_greedy: Any, setup: str) -> None:
    llm = LLM(model_dir, **ENGINE_SETUPS[setup])
    vocab = llm.engine.vocab_size
    prompts = _prompts(10, vocab, seed=1) + _prompts(4, vocab, seed=2, shared_prefix=13)
    max_new = [random.Random(i).randint(4, 24) for i in range(len(prompts))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_new]
    outputs = llm.generate(prompts, params)
    for prompt, m, out in zip(prompts, max_new, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(prompt, m), (setup, prompt)
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.num_free_blocks == llm.engine.num_blocks  # no leaks
    assert not llm.engine.scheduler.has_unfinished


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


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(model_dir: Path) -> None:
    llm = LLM(model_dir, max_model_len=64)
    engine = llm.engine
    good = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequestError, match="context is 64"):
        engine.add_request(list(range(3, 70)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request([5, 6], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.add_request([5, 6], SamplingParams(top_p=1.5))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.add_request([5, 6], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([5, 10**6], SamplingParams())
    finished = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == good and out.finished:
                finished = out
    assert finished is not None and len(finished.outputs[0].token_ids) == 8
    assert engine.num_free_blocks == engine.num_blocks


def test_request_that_can_never_fit_fails_alone(model_dir: Path) -> None:
    llm = LLM(model_dir, num_kv_blocks=6, block_size=4)  # 24 token slots
    outs = llm.generate(
        [[5, 6, 7], list(range(3, 20))],
        [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0, max_tokens=30)],
    )
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) >= 1
    assert outs[1].error is not None and "KV cache" in outs[1].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert llm.engine.num_free_blocks == llm.engine.num_blocks


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
    deadline = 50
    while llm.engine.has_unfinished_requests() and deadline:
        deadline -= 1
        asyncio.run(asyncio.sleep(0.01))
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
