"""The official openai client against a real server: completions and chat, sync and async, streaming
and not, and greedy outputs equal to the local LLM's token for token."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import openai
import pytest
import torch

from lmstack.core import Tokenizer, load_pretrained
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.server._logprobs import TokenTexts

MODEL = "tiny"
GREEDY = {"temperature": 0}


def _greedy(
    reference: LLM, prompt: str | list[int], max_tokens: int, **options: object
) -> tuple[str, list[int]]:
    [out] = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **options))
    return out.outputs[0].text, out.outputs[0].token_ids


def test_models_lists_the_served_model(live) -> None:
    client = live.openai()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completions_batch_is_greedy_equal_to_local_generate(live, reference: LLM) -> None:
    texts = TokenTexts(reference.tokenizer)
    prompts = ["the quick brown", "a lazy dog jumps over", "seven wizards"]
    response = live.openai().completions.create(
        model=MODEL, prompt=prompts, max_tokens=8, logprobs=0, **GREEDY
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    completion_tokens = 0
    for prompt, choice in zip(prompts, response.choices, strict=True):
        text, ids = _greedy(reference, prompt, 8)
        assert choice.text == text
        assert choice.logprobs.tokens == [texts.text(t) for t in ids]  # token for token
        assert choice.finish_reason == "length"
        completion_tokens += len(ids)
    assert response.usage.completion_tokens == completion_tokens == 24
    assert response.usage.prompt_tokens == sum(len(reference.tokenizer.encode(p)) for p in prompts)


def test_completion_token_id_prompt_and_stream(live, reference: LLM) -> None:
    ids = reference.tokenizer.encode("jovial zebras quietly")
    text, _ = _greedy(reference, ids, 10)
    client = live.openai()
    whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY)
    assert whole.choices[0].text == text
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=10, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_sync_and_async_stream_equal_local_chat(live, reference: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"}]
    [expected] = reference.chat(messages, SamplingParams(temperature=0, max_tokens=12))
    want = expected.outputs[0].text

    response = live.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == want
    assert response.usage.prompt_tokens == len(reference.render_chat(messages))
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    async def stream() -> tuple[str, list]:
        client = live.async_openai()
        parts, chunks = [], []
        async with await client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=12, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        ) as events:  # fmt: skip
            async for chunk in events:
                chunks.append(chunk)
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
        await client.close()
        return "".join(parts), chunks

    text, chunks = asyncio.run(stream())
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_async_completions_run_concurrently(live, reference: LLM) -> None:
    prompts = ["the dog", "a fox", "hex zebras", "quick wizards"]

    async def run() -> list[str]:
        client = live.async_openai()
        calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY) for p in prompts]
        responses = await asyncio.gather(*calls)
        await client.close()
        return [r.choices[0].text for r in responses]

    assert asyncio.run(run()) == [_greedy(reference, p, 6)[0] for p in prompts]


def test_chat_logprobs_match_local_logprobs(live, reference: LLM) -> None:
    messages = [{"role": "user", "content": "a lazy dog"}]
    response = live.openai().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY
    )
    [expected] = reference.chat(messages, SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    texts = TokenTexts(reference.tokenizer)
    content = response.choices[0].logprobs.content
    assert [item.token for item in content] == [texts.text(t) for t in expected.outputs[0].token_ids]
    for item, token, entry in zip(
        content, expected.outputs[0].token_ids, expected.outputs[0].logprobs, strict=True
    ):
        assert item.logprob == pytest.approx(entry[token], abs=1e-4)
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert bytes(item.bytes) == texts.raw(token)


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(live) -> None:
    client = live.openai()
    options = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 3,
               "seed": 7, "temperature": 1.0, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.2,
               "extra_body": {"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1}}  # fmt: skip
    first = client.chat.completions.create(**options)
    second = client.chat.completions.create(**options)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1  # the samples differ from each other


def test_stop_string_ends_the_completion(live, reference: LLM) -> None:
    prompt = "the quick brown fox"
    full, _ = _greedy(reference, prompt, 16)
    stop = next(ch for ch in full[2:] if ch.isascii() and ch.isalnum())
    response = live.openai().completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stop=[stop], **GREEDY
    )
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    assert stop not in response.choices[0].text


def test_max_tokens_and_max_completion_tokens_bound_the_reply(live) -> None:
    client = live.openai()
    messages = [{"role": "user", "content": "go"}]
    for key in ("max_tokens", "max_completion_tokens"):
        response = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True}, **{key: 3}
        )
        assert response.usage.completion_tokens == 3
        assert response.choices[0].finish_reason == "length"


def test_echo_logprobs_score_the_prompt_like_loglikelihood_and_torch(
    live, reference: LLM, model_dir: Path
) -> None:
    context, continuation = "the quick brown", " fox jumps over"
    response = live.openai().completions.create(
        model=MODEL, prompt=context + continuation, max_tokens=0, echo=True, logprobs=2
    )
    choice = response.choices[0]
    assert choice.text == context + continuation
    assert response.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = reference.tokenizer.encode(context + continuation)
    assert len(lp.tokens) == len(ids)

    # Independent reference: a plain dense forward of the checkpoint and a log-softmax.
    model = load_pretrained(model_dir).eval()
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    direct = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(direct, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        best = float(logprobs[i - 1].max())
        assert max(top.values()) == pytest.approx(best, abs=1e-4)

    # And the scoring API: the continuation's share of the echo equals loglikelihood.
    ctx_len = len(reference.tokenizer.encode(context))
    [(score, _)] = reference.loglikelihood([(ids[:ctx_len], ids[ctx_len:])])
    assert sum(lp.token_logprobs[ctx_len:]) == pytest.approx(score, abs=1e-3)
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_generation_returns_prompt_then_completion(live, reference: LLM) -> None:
    prompt = "a lazy dog"
    text, ids = _greedy(reference, prompt, 4)
    client = live.openai()
    whole = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1, **GREEDY
    )
    assert whole.choices[0].text == prompt + text
    assert len(whole.choices[0].logprobs.tokens) == len(reference.tokenizer.encode(prompt)) + len(ids)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, stream=True,
                                            **GREEDY))  # fmt: skip
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == prompt + text


def test_json_response_format_is_honoured_and_text_is_fine(live) -> None:
    client = live.openai()
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, response_format={"type": "json_object"},
        extra_body={"guided_json_fit": True},  # the random model's object must close within 40 tokens
    )  # fmt: skip
    assert isinstance(json.loads(reply.choices[0].message.content), dict)  # the random model, constrained
    ok = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, response_format={"type": "text"}
    )
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_unknown_model_is_404_through_the_client(live) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        live.openai().completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"
    assert MODEL in caught.value.body["message"]


def test_wrong_api_key_is_401_through_the_client(live) -> None:
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_logprob_values_are_finite_json(live) -> None:
    response = live.openai().completions.create(
        model=MODEL, prompt="the", max_tokens=4, logprobs=5, extra_body={"min_tokens": 4}, **GREEDY
    )
    for value in response.choices[0].logprobs.token_logprobs:
        assert math.isfinite(value)


def test_a_messages_name_reaches_the_chat_template(start_server, model_dir: Path, tmp_path: Path) -> None:
    named = tmp_path / "named"
    shutil.copytree(model_dir, named)
    settings = json.loads((named / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for m in messages %}{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: {{ m.content }}\n"
        "{% endfor %}assistant:"
    )
    (named / "tokenizer_config.json").write_text(json.dumps(settings))
    conversation = [{"role": "user", "name": "zebras", "content": "the quick fox"}]
    with start_server(model=named) as server:
        response = server.openai().chat.completions.create(model=MODEL, messages=conversation, max_tokens=1)
    tokenizer = Tokenizer.from_pretrained(named)
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == "user (zebras): the quick fox\nassistant:"
    assert response.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
