"""RemoteLLM end to end against the real `lmstack serve` application, run by uvicorn on loopback.

Every answer is checked against a local LLM on the same model: greedy outputs token for token,
streams, log-likelihoods, and that closing a stream early frees the server's KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from live_server import serve_app  # noqa: E402

from lmstack.infer import LLM, LLMProtocol, RemoteInvalidRequestError, RemoteLLM, SamplingParams  # noqa: E402
from lmstack.infer.server import ServerConfig, create_app  # noqa: E402

MODEL = "tiny"
KEY = "sk-remote"
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=0)


@dataclass
class Served:
    url: str
    llm: LLM  # the server's own model

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the server's engine has no request and every KV block is free."""
        engine = self.llm.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not engine.has_unfinished_requests() and engine.num_free_blocks == engine.num_blocks:
                return
            time.sleep(0.01)
        raise AssertionError(
            f"{engine.num_blocks - engine.num_free_blocks} KV blocks still used after {timeout}s"
        )


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Served]:
    llm = LLM(model_dir)
    app = create_app(llm, ServerConfig(model_name=MODEL, api_keys=[KEY]))
    with serve_app(app) as base:
        yield Served(base, llm)


@pytest.fixture(scope="module")
def local(model_dir: Path) -> Iterator[LLM]:
    llm = LLM(model_dir)
    yield llm
    llm.close()


@pytest.fixture
def remote(served: Served, model_dir: Path) -> Iterator[RemoteLLM]:
    with RemoteLLM(served.url, api_key=KEY, tokenizer=model_dir, max_concurrency=4) as client:
        yield client


def test_models_and_protocol(remote: RemoteLLM) -> None:
    assert isinstance(remote, LLMProtocol)
    assert remote.models() == [MODEL]


def test_greedy_generate_equals_local_token_for_token(remote: RemoteLLM, local: LLM) -> None:
    prompts: list[Any] = [
        "the quick brown",
        "a lazy dog jumps over",
        "seven wizards",
        local.tokenizer.encode("hex"),
    ]
    got = remote.generate(prompts, GREEDY)
    assert remote.model == MODEL  # picked: the server serves only it
    want = local.generate(prompts, GREEDY)
    for g, w in zip(got, want, strict=True):
        (gs,), (ws,) = g.outputs, w.outputs
        assert gs.text == ws.text and gs.finish_reason == ws.finish_reason == "length"
        assert gs.token_ids == ws.token_ids  # from the server's per-token log-probs
        assert [list(d) for d in gs.logprobs or []] == [[t] for t in ws.token_ids]
        assert gs.cumulative_logprob == pytest.approx(ws.cumulative_logprob, abs=1e-3)
        assert g.prompt_token_ids == w.prompt_token_ids
        assert g.usage is not None and g.usage.completion_tokens == len(ws.token_ids) == 10


def test_greedy_chat_equals_local(remote: RemoteLLM, local: LLM) -> None:
    conversations = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"}],
        [{"role": "user", "content": "seven jovial zebras"}],
    ]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    got = remote.chat(conversations, params)
    want = local.chat(conversations, params)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.usage is not None and g.usage.prompt_tokens == len(w.prompt_token_ids)


def test_stream_deltas_concatenate_to_the_local_text(remote: RemoteLLM, local: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=16)
    conversation = [{"role": "user", "content": "a lazy dog"}]

    async def collect(prompt: Any) -> list[Any]:
        async with contextlib.aclosing(remote.stream(prompt, params)) as stream:
            return [out async for out in stream]

    for prompt, (want,) in [
        ("the quick brown", local.generate("the quick brown", params)),
        (conversation, local.chat(conversation, params)),
    ]:
        outs = asyncio.run(collect(prompt))
        assert len(outs) > 1 and [o.finished for o in outs][-1] and not any(o.finished for o in outs[:-1])
        assert "".join(o.outputs[0].text for o in outs) == want.outputs[0].text
        assert outs[-1].outputs[0].finish_reason == want.outputs[0].finish_reason
        assert outs[-1].usage is not None and outs[-1].usage.completion_tokens == len(
            want.outputs[0].token_ids
        )


def test_loglikelihood_equals_local(remote: RemoteLLM, local: LLM) -> None:
    tok = local.tokenizer
    (greedy,) = local.generate("the quick brown", SamplingParams(temperature=0, max_tokens=4))
    pairs: list[Any] = [
        ("the quick brown", " fox"),
        ("seven wizards quietly", " hex jovial zebras"),
        ("the quick brown", greedy.outputs[0].text),
        ("caf\u00e9 \u65e5\u672c the quick", " fox caf\u00e9"),
    ]
    id_pairs: list[Any] = [(tok.encode("a lazy"), tok.encode(" dog", add_special_tokens=False))]
    for batch in (pairs, id_pairs):
        got = remote.loglikelihood(batch)
        want = local.loglikelihood(batch)
        assert [g for _, g in got] == [w for _, w in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-4, abs=1e-4)
    assert remote.loglikelihood(pairs[2:3])[0][1] is True


def test_server_errors_surface_with_their_message(remote: RemoteLLM) -> None:
    with pytest.raises(RemoteInvalidRequestError, match="maximum context length") as info:
        remote.generate("the " * 300, SamplingParams(max_tokens=5))
    assert info.value.status_code == 400


def test_closing_a_stream_early_frees_the_servers_kv_blocks(served: Served, remote: RemoteLLM) -> None:
    served.wait_idle()
    step = served.llm.engine.step
    steps = 0

    def slow_step() -> Any:  # keeps the request running while the client reads
        nonlocal steps
        steps += 1
        time.sleep(0.02)
        return step()

    served.llm.engine.step = slow_step  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def read_two() -> int:
        got = 0
        async with contextlib.aclosing(remote.stream("the quick brown", params)) as stream:
            async for out in stream:
                got += len(out.outputs[0].text) > 0
                if got == 2:
                    used = served.llm.engine.num_blocks - served.llm.engine.num_free_blocks
                    assert used > 0 and served.llm.engine.has_unfinished_requests()
                    break
        return got

    try:
        assert asyncio.run(read_two()) == 2
        served.wait_idle()
        assert steps < 100  # aborted when the client left, not run to its 200 tokens
    finally:
        served.llm.engine.step = step  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def lmstack_serve(long_model_dir: Path) -> Iterator[str]:
    """``lmstack serve`` itself, in its own process, on the model with a 2048-token context."""
    args = [str(Path(sys.executable).with_name("lmstack")), "serve", str(long_model_dir), "--port", "0",
            "--served-model-name", MODEL, "--api-key", KEY, "--max-num-seqs", "4"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the ready line, printed once the server accepts requests
        assert line.startswith(f"lmstack serve: {MODEL} on http://127.0.0.1:"), (line, proc.stderr.read())
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()
        proc.stderr.close()


def test_a_1000_token_id_prompt_generates_and_scores_through_lmstack_serve(
    lmstack_serve: str, long_model_dir: Path
) -> None:
    local = LLM(long_model_dir, max_num_seqs=4)
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "wizards", "hex"]
    ids = local.tokenizer.encode(" ".join(rng.choice(words) for _ in range(2000)))[:1000]
    assert len(ids) == 1000
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    pair = (ids[:980], ids[980:])
    with RemoteLLM(lmstack_serve, api_key=KEY, tokenizer=long_model_dir) as remote:
        [got] = remote.generate(ids, params)  # a flat list of ids is one prompt, not a batch of 1000
        [(logprob, greedy)] = remote.loglikelihood([pair])
    [want] = local.generate(ids, params)
    [(want_logprob, want_greedy)] = local.loglikelihood([pair])
    local.close()
    assert got.prompt_token_ids == ids and got.usage is not None and got.usage.prompt_tokens == 1000
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].text == want.outputs[0].text
    assert logprob == pytest.approx(want_logprob, rel=1e-4, abs=1e-3) and greedy == want_greedy
