"""The client side of test_no_stall, run in a process of its own: it measures the server, not itself.

The server under test runs in the test's process (uvicorn in a thread); a client in that process
would share its GIL, and its own pauses would count as the server's stalls.

Usage: ``python stall_client.py big BASE_URL ENDPOINT BODY_FILE`` or ``python stall_client.py churn
BASE_URL``; prints the figures as one JSON object.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny"
KEY = {"Authorization": "Bearer sk-test"}


@dataclass
class _Streams:
    """Streaming completions whose chunk arrival times are recorded."""

    base_url: str
    arrivals: list[list[float]] = field(default_factory=list)

    async def run(
        self, client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event | None = None
    ) -> None:
        times: list[float] = []
        self.arrivals.append(times)
        body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body, headers=KEY) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    if started is not None:
                        started.set()

    def worst_gap(self, start: float, end: float) -> float:
        """The longest wait for a stream's next chunk that overlaps ``[start, end]``."""
        worst = 0.0
        for times in self.arrivals:
            for a, b in itertools.pairwise(times):
                if b >= start and a <= end:
                    worst = max(worst, b - a)
        return worst


async def _poll_health(client: httpx.AsyncClient, done: Callable[[], bool]) -> list[float]:
    latencies = []
    while not done():
        t0 = time.perf_counter()
        response = await client.get("/health")
        latencies.append(time.perf_counter() - t0)
        assert response.status_code == 200
        await asyncio.sleep(0.005)
    return latencies


def measure_big_prompt(
    base_url: str, endpoint: str, body: dict[str, Any], streams: int = 8
) -> dict[str, float]:
    """Run ``streams`` streams, then send ``body`` (2 MiB) while polling ``/health``; the figures."""

    async def main() -> dict[str, float]:
        limits = httpx.Limits(max_connections=streams + 4)
        # Every client is made, and the body serialized, before the clock starts: making a client
        # loads its TLS context, which stalls this (the measuring) event loop for 100 ms or more.
        payload = json.dumps(body).encode()
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client, \
                httpx.AsyncClient(base_url=base_url, timeout=60) as health_client, \
                httpx.AsyncClient(base_url=base_url, timeout=120) as big_client:  # fmt: skip
            recorder = _Streams(base_url)
            first = asyncio.Event()
            tasks = [asyncio.create_task(recorder.run(client, 1500, first)) for _ in range(streams)]
            await first.wait()
            for warm in (health_client, big_client):  # connected before the clock starts
                assert (await warm.get("/health")).status_code == 200
            await asyncio.sleep(0.6)  # the streams' gaps before the big prompt
            sent = time.perf_counter()
            done = False
            poller = asyncio.create_task(_poll_health(health_client, lambda: done))
            response = await big_client.post(endpoint, content=payload, headers=KEY)
            answered = time.perf_counter()
            await asyncio.sleep(0.1)
            done = True
            latencies = await poller
            assert all(not t.done() for t in tasks), "the streams ended before the big prompt was answered"
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return {
                "status": response.status_code,
                "answered_s": answered - sent,
                "gap_before": recorder.worst_gap(0.0, sent - 0.05),
                "gap_during": recorder.worst_gap(sent, answered),
                "health_max": max(latencies),
                "health_polls": len(latencies),
            }

    return asyncio.run(main())


def measure_churn(base_url: str) -> dict[str, float]:
    """64 streams, and a new stream plus a disconnect every 10 ms until one of the 64 ends; the figures."""

    async def main() -> tuple[float, int, int]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            recorder = _Streams(base_url)
            first = asyncio.Event()
            long = [asyncio.create_task(recorder.run(client, 120, first)) for _ in range(64)]
            await first.wait()
            while not all(recorder.arrivals[i] for i in range(64)):
                await asyncio.sleep(0.005)
            start = time.perf_counter()
            churn = _Streams(base_url)
            joined: list[asyncio.Task[None]] = []
            aborted = 0
            while not any(t.done() for t in long) and time.perf_counter() - start < 8:
                joined.append(asyncio.create_task(churn.run(client, 64)))
                # Abort (disconnect) the oldest join still running: it is mid-prefill or decoding.
                running = [t for t in joined[:-1] if not t.done()]
                if running:
                    running[0].cancel()
                    aborted += 1
                await asyncio.sleep(0.01)
            end = time.perf_counter()
            results = await asyncio.gather(*long, return_exceptions=True)
            assert not [r for r in results if isinstance(r, BaseException)], results
            for task in joined:
                task.cancel()
            await asyncio.gather(*joined, return_exceptions=True)
            # Only the 64 long streams are judged: their gaps while the churn ran.
            long_only = _Streams(base_url, recorder.arrivals[:64])
            return long_only.worst_gap(start, end), len(joined), aborted

    gap, joins, aborts = asyncio.run(main())
    return {"worst_gap": gap, "joins": joins, "aborts": aborts}


if __name__ == "__main__":
    if sys.argv[1] == "big":
        body = json.loads(Path(sys.argv[4]).read_text())
        figures = measure_big_prompt(sys.argv[2], sys.argv[3], body)
    else:
        figures = measure_churn(sys.argv[2])
    print(json.dumps(figures))
