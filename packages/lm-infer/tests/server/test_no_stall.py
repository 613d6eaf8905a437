"""The event loop never waits for the engine: a huge prompt, and a burst of joins and aborts, stall no stream.

Latency bounds are the must-show of issue 14, measured on a real uvicorn server: a 2 MiB prompt delays
the other streams by under 100 ms and ``/health`` answers within 50 ms throughout; 64 streams plus a
new request and an abort every 10 ms see no gap longer than the engine's longest step plus scheduling
slack, and leak no KV block; echo scoring runs in chunks between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import load_pretrained
from lmstack.infer import SamplingParams

MODEL = "tiny"
CLIENT = Path(__file__).with_name("stall_client.py")
BIG = 2 * 1024 * 1024
# What the server's event loop may add to an engine step before a chunk reaches its client, on a
# loaded two-core machine: the loop shares the GIL (and two cores) with the engine thread, and in one
# step it writes 64+ streams' chunks and takes new requests and disconnects. Measured here: 10-110 ms
# (the engine lock on the loop, before the engine core moved off it: 1.7 s over the longest step).
SLACK = 0.15


def _big_text() -> str:
    words = "the quick brown fox jumps over a lazy dog while seven jovial wizards quietly hex zebras "
    return (words * (BIG // len(words) + 1))[:BIG]


def _client(tmp_path: Path, *args: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run stall_client.py (the measuring client) in a process of its own; its figures."""
    argv = [sys.executable, str(CLIENT), *args]
    if body is not None:
        path = tmp_path / "body.json"
        path.write_text(json.dumps(body))
        argv.append(str(path))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _big_token_ids() -> list[int]:
    """Just over 2 MiB of JSON token ids (1-3 digits and ", " each, 4.6 bytes on average): 460,000 ids."""
    return [3 + i % 250 for i in range(460_000)]


@pytest.mark.parametrize("kind", ["completion", "chat", "tokenized", "token-ids"])
def test_a_2mib_prompt_stalls_no_stream_and_health_answers(
    start_server, long_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    """Refused by its size alone (completion, chat), after tokenizing 20,000 characters in a thread, or,
    given as 460,000 token ids, after decoding the JSON in the server's child process."""
    text = _big_text()
    if kind == "token-ids":
        endpoint, body = "/v1/completions", {"model": MODEL, "prompt": _big_token_ids(), "max_tokens": 4}
        assert len(json.dumps(body)) >= BIG
    elif kind == "tokenized":  # short enough to need tokenizing to know it is too long (3,600 tokens)
        endpoint, body = "/v1/completions", {"model": MODEL, "prompt": text[:20000], "max_tokens": 4}
    elif kind == "completion":
        endpoint, body = "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 4}
    else:
        endpoint = "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    # Every step waits 2 ms more, so that the streams outlast the big request on any machine.
    with start_server(model=long_model_dir, slow=0.002) as server:
        figures = _client(tmp_path, "big", server.base_url, endpoint, body=body)
        print(f"\n{kind}: {figures}")
        assert figures["status"] == 400  # the prompt is refused for length, with the streams untouched
        assert figures["gap_during"] < figures["gap_before"] + 0.1, figures
        assert figures["health_max"] < 0.05, figures
        server.wait_idle()


def test_echo_scoring_of_a_long_prompt_runs_between_steps(start_server, long_model_dir: Path) -> None:
    """Echo log-probs of a 2,000-token prompt are computed in chunks of a step's budget between steps."""
    engine = {"max_num_batched_tokens": 256}
    with start_server(model=long_model_dir, engine=engine) as server:
        llm = server.llm
        ids = (llm.tokenizer.encode(_big_text()[:20000]) * 2)[:2000]
        model = load_pretrained(long_model_dir).eval()  # the reference: one dense forward
        with torch.inference_mode():
            reference = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)

        async def main() -> tuple[list[Any], float]:
            stream = llm.stream("the quick brown fox", SamplingParams(max_tokens=1800, ignore_eos=True))
            times: list[float] = []

            async def read() -> None:
                async for _ in stream:
                    times.append(time.perf_counter())

            reader = asyncio.create_task(read())
            while not times:
                await asyncio.sleep(0.001)
            llm.reset_step_stats()
            got = await asyncio.to_thread(llm.prompt_logprobs, ids, 2)
            stats = llm.step_stats()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            chunks = -(-(len(ids) - 1) // engine["max_num_batched_tokens"])
            assert stats.steps >= chunks - 1  # a step between every two chunks: the stream kept going
            return got, max(gaps) - stats.max_turn_s

        got, excess = asyncio.run(main())
        assert len(got) == len(ids) and got[0] is None
        for i in range(1, len(ids)):
            entry = got[i]
            assert entry is not None
            assert entry[ids[i]] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-4)
            values, indices = reference[i - 1].topk(2)
            for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                assert entry[index] == pytest.approx(value, abs=1e-4)
        assert excess < SLACK
        server.wait_idle()


def test_64_streams_with_joins_and_aborts_every_10ms_never_stall(start_server, tmp_path: Path) -> None:
    engine = {"max_num_seqs": 128}
    # Every step waits 20 ms more (the GIL free): 64 streams then make ~3,000 chunks a second, which
    # the server and the measuring client handle with room to spare on two shared cores.
    with start_server(engine=engine, slow=0.02, max_queue=512) as server:
        llm = server.llm
        llm.reset_step_stats()
        figures = _client(tmp_path, "churn", server.base_url)
        stats = llm.step_stats()
        print(f"\n{figures}, {stats}")
        assert figures["joins"] >= 20 and figures["aborts"] >= 10
        # No stall beyond one step: the longest step (which includes the joins' prefill) plus slack.
        assert figures["worst_gap"] < stats.max_step_s + SLACK, (figures, stats)
        # Every aborted, finished or cancelled request gave its blocks back.
        deadline = time.monotonic() + 10
        while llm.engine.num_free_blocks != llm.engine.num_blocks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm.engine.num_free_blocks == llm.engine.num_blocks
        server.wait_idle()
