"""Load: many concurrent streams all complete and free their KV blocks; past the queue limit the
server answers 429 at once and keeps serving."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from lmstack.infer import LLM, SamplingParams

MODEL = "tiny"
KEY = {"Authorization": "Bearer sk-test"}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "wizards", "hex"]


def test_64_concurrent_streams_complete_and_free_every_block(live, reference: LLM) -> None:
    rng = random.Random(0)
    jobs = []
    for i in range(64):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        jobs.append((prompt, rng.randint(1, 24), i % 2 == 0))  # (prompt, max_tokens, chat?)
    before = live.metrics()

    async def one(client, prompt: str, max_tokens: int, chat: bool) -> tuple[str, int]:
        common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}  # fmt: skip
        if chat:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **common
            )
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        parts, usage = [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "" if chat else choice.text)
        return "".join(parts), usage.completion_tokens

    async def run() -> list[tuple[str, int]]:
        client = live.async_openai()
        results = await asyncio.gather(*(one(client, *job) for job in jobs))
        await client.close()
        return results

    results = asyncio.run(run())
    assert [tokens for _, tokens in results] == [max_tokens for _, max_tokens, _ in jobs]

    # Greedy under a 64-way continuous batch equals the local engine's answers.
    completions = [(p, n) for p, n, chat in jobs if not chat]
    outs = reference.generate(
        [p for p, _ in completions],
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in completions],
    )
    assert [text for (text, _), (_, _, chat) in zip(results, jobs, strict=True) if not chat] == [
        o.outputs[0].text for o in outs
    ]

    live.wait_idle()
    after = live.metrics()
    assert after["lmstack_kv_blocks_used"] == 0
    assert after["lmstack_kv_blocks_total"] == live.llm.engine.num_blocks
    assert after["lmstack_requests_in_flight"] == 0
    assert after["lmstack_seqs_running"] == 0 and after["lmstack_seqs_waiting"] == 0
    generated = after["lmstack_generation_tokens_total"] - before["lmstack_generation_tokens_total"]
    assert generated == sum(n for _, n, _ in jobs)


def test_a_burst_past_max_queue_gets_429_and_the_server_keeps_serving(start_server) -> None:
    limit = 4
    # Slow steps keep the held requests in flight while the burst arrives.
    with start_server(max_queue=limit, slow=0.02) as server:

        async def run() -> tuple[list[httpx.Response], int]:
            async with httpx.AsyncClient(base_url=server.base_url, headers=KEY, timeout=60) as client:
                body = {
                    "model": MODEL,
                    "prompt": "the",
                    "max_tokens": 200,
                    "stream": True,
                    "ignore_eos": True,
                }
                holds = []
                for _ in range(limit):
                    request = client.build_request("POST", "/v1/completions", json=body)
                    response = await client.send(request, stream=True)
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    while not (await anext(lines)).startswith("data: {"):
                        pass
                    holds.append((response, lines))  # dropping the line iterator would close the stream
                assert server.state.in_flight == limit
                burst = [
                    client.post(
                        "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                    )
                    for _ in range(8)
                ] + [client.post("/v1/completions", json={"model": MODEL, "prompt": "y"}) for _ in range(4)]
                rejected = await asyncio.gather(*burst)
                in_flight = server.state.in_flight
                for response, _ in holds:
                    await response.aclose()  # the clients leave: their requests are aborted
                return rejected, in_flight

        rejected, in_flight = asyncio.run(run())
        assert in_flight == limit
        for response in rejected:
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert str(limit) in error["message"]
        server.wait_idle()
        # After the burst, an ordinary request is served.
        with server.http() as client:
            ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] <= 3
        metrics = server.metrics()
        assert metrics['lmstack_requests_total{endpoint="/v1/chat/completions",status="429"}'] == 8
        assert metrics['lmstack_requests_total{endpoint="/v1/completions",status="429"}'] == 4
        assert metrics["lmstack_kv_blocks_used"] == 0


def test_streamed_events_are_well_formed_sse(live) -> None:
    body = {
        "model": MODEL,
        "prompt": ["a", "the dog"],
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "temperature": 0,
    }
    with live.http() as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    indices = set()
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        chunk = json.loads(event[6:])
        assert chunk["object"] == "text_completion"
        indices.update(choice["index"] for choice in chunk["choices"])
    assert indices == {0, 1, 2, 3}  # prompt-major: prompt i, sample j is choice i * n + j
