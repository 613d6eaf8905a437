"""``RemoteLLM.loglikelihood_rolling`` against the real ``lmstack serve`` app (uvicorn on loopback).

It must give the local ``LLM``'s numbers, windows of more than 256 token ids included, through
``/v1/completions`` with ``echo``, ``logprobs: 1`` and ``max_tokens: 0``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from live_server import serve_app  # noqa: E402

from lmstack.infer import (  # noqa: E402
    LLM,
    InvalidRequestError,
    LLMProtocol,
    RemoteLLM,
    TokenizerUnavailableError,
)
from lmstack.infer.server import ServerConfig, create_app  # noqa: E402

MODEL = "tiny"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "wizards", "hex"]


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def local(long_model_dir: Path) -> Iterator[LLM]:
    llm = LLM(long_model_dir)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def url(long_model_dir: Path) -> Iterator[str]:
    """``lmstack serve``'s app on the model with a 2048-token context, served by uvicorn."""
    llm = LLM(long_model_dir)
    app = create_app(llm, ServerConfig(model_name=MODEL))
    try:
        with serve_app(app) as base:
            yield base
    finally:
        llm.close()


@pytest.fixture
def remote(url: str, long_model_dir: Path) -> Iterator[RemoteLLM]:
    with RemoteLLM(url, tokenizer=long_model_dir, max_concurrency=4) as client:
        yield client


def texts_to_score(local: LLM) -> list[Any]:
    long_ids = local.tokenizer.encode(words(600, seed=1), add_special_tokens=False)[:1100]
    assert len(long_ids) == 1100
    return ["the quick brown fox.", words(150, seed=2), long_ids, [], words(3, seed=3)]


def test_equals_local_with_windows_over_256_token_ids(remote: RemoteLLM, local: LLM) -> None:
    assert isinstance(remote, LLMProtocol)
    texts = texts_to_score(local)
    for max_length in (300, 16):  # 1100 ids in windows of 300 ids (301 echoed), and many small ones
        got = remote.loglikelihood_rolling(texts, max_length=max_length)
        want = local.loglikelihood_rolling(texts, max_length=max_length)
        assert got == pytest.approx(want, rel=1e-4)
        assert got[3] == 0.0
    # The last text's windows are conditioned on tokens before them: not the same as one long window.
    assert abs(got[2] - local.loglikelihood_rolling([texts[2]], max_length=1100)[0]) > 1e-2


def test_default_window_is_the_servers_context_minus_one(remote: RemoteLLM, local: LLM) -> None:
    ids = local.tokenizer.encode(words(1500, seed=4), add_special_tokens=False)[:2500]
    assert len(ids) == 2500 > local.max_model_len
    [got] = remote.loglikelihood_rolling([ids])
    [want] = local.loglikelihood_rolling([ids], max_length=local.max_model_len - 1)
    assert got == pytest.approx(want, rel=1e-4)
    with pytest.raises(InvalidRequestError, match="longest window this model can score is 2047"):
        remote.loglikelihood_rolling([ids], max_length=local.max_model_len)


def test_independent_of_concurrency_and_async(url: str, long_model_dir: Path, local: LLM) -> None:
    texts = texts_to_score(local)[:3]
    with RemoteLLM(url, tokenizer=long_model_dir, max_concurrency=1) as one:
        serial = one.loglikelihood_rolling(texts, max_length=64)
    with RemoteLLM(url, tokenizer=long_model_dir, max_concurrency=16) as many:
        concurrent = asyncio.run(many.aloglikelihood_rolling(texts, max_length=64))
        alone = [many.loglikelihood_rolling([t], max_length=64)[0] for t in texts]
    assert concurrent == serial == alone  # the server scores each window alone: exactly the same


def test_needs_a_tokenizer(url: str) -> None:
    with RemoteLLM(url) as bare:
        for texts in (["the fox"], [[5, 6, 7]]):
            with pytest.raises(TokenizerUnavailableError, match="has no tokenizer"):
                bare.loglikelihood_rolling(texts, max_length=16)


def test_bad_requests_are_refused_before_anything_is_sent(remote: RemoteLLM) -> None:
    with pytest.raises(InvalidRequestError, match="at least 2"):
        remote.loglikelihood_rolling(["the fox"], max_length=1)
    with pytest.raises(InvalidRequestError, match="wrap a single one in a list"):
        remote.loglikelihood_rolling("the fox")


def test_a_server_that_does_not_report_its_context_needs_max_length(long_model_dir: Path) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        body = json.loads(request.content)
        seen.append(body)
        n = len(body["prompt"])
        logprobs = {
            "tokens": [f"token_id:{t}" for t in body["prompt"]],
            "token_logprobs": [None] + [-1.0] * (n - 1),
            "top_logprobs": [None] + [{"x": -0.5}] * (n - 1),
            "text_offset": list(range(n)),
        }
        return httpx.Response(200, json={"choices": [{"text": "", "logprobs": logprobs}]})

    transport = httpx.MockTransport(handler)
    with RemoteLLM("http://testserver", tokenizer=long_model_dir, transport=transport) as client:
        with pytest.raises(InvalidRequestError, match="pass max_length="):
            client.loglikelihood_rolling(["the quick brown fox"])
        assert not seen
        ids = list(range(10, 30))
        assert client.loglikelihood_rolling([ids], max_length=8) == [-20.0]
    assert [len(b["prompt"]) for b in seen] == [9, 9, 9]  # bos + 8, then 8 before each of 8 and 4 ids
    assert all(b["echo"] is True and b["max_tokens"] == 0 and b["logprobs"] == 1 for b in seen)
