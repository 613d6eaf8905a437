"""Server metrics in Prometheus' text format, kept by ``prometheus_client``.

Each application has its own :class:`~prometheus_client.CollectorRegistry`, so two applications in
one process (tests, several models) keep separate counts. When ``PROMETHEUS_MULTIPROC_DIR`` is set
(before ``prometheus_client`` is imported, as its multi-process mode requires), the metrics are
written to that directory instead, and ``/metrics`` reports the sum over every process that writes
there.

Counters and histograms are updated from the server's event loop; the gauges (queue length, running
sequences, KV blocks) are read from the engine when ``/metrics`` is scraped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

__all__ = ["CONTENT_TYPE", "GAUGES", "Metrics"]

# What generate_latest writes (prometheus_client's CONTENT_TYPE_LATEST names a newer format in recent
# versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Whole-request latency: from tens of milliseconds (a short completion) to minutes (a long one).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token: queueing plus prefill.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GAUGES = {
    "lmstack_requests_in_flight": "Generation requests admitted, not yet answered.",
    "lmstack_max_queue": "Most generation requests in flight (--max-queue).",
    "lmstack_seqs_waiting": "Sequences waiting in the engine's queue.",
    "lmstack_seqs_running": "Sequences running (holding KV blocks).",
    "lmstack_kv_blocks_total": "KV-cache blocks.",
    "lmstack_kv_blocks_used": "KV-cache blocks held by sequences.",
    "lmstack_engine_steps": "Engine steps run since the server started.",
    "lmstack_engine_step_seconds_max": "The longest engine step since the server started.",
}
"""The live gauges of ``/metrics``, by name, with their help texts."""


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The server's counters, histograms and gauges, and their exposition."""

    def __init__(self) -> None:
        multi = _multiprocess()
        # Multi-process mode: the metrics write to the directory and are read back from it by a
        # collector, so they must not be registered as well (they would be counted twice).
        registry = None if multi else CollectorRegistry()
        self.requests = Counter(
            "lmstack_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"],
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "lmstack_prompt_tokens", "Prompt tokens submitted to the engine.", registry=registry
        )
        self.generation_tokens = Counter("lmstack_generation_tokens", "Tokens generated.", registry=registry)
        self.latency = Histogram(
            "lmstack_request_latency_seconds", "Time from request to end of response.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "lmstack_time_to_first_token_seconds", "Time from admission to first token.", ["endpoint"],
            buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        # "livesum": each live process reports its own engine; the sum is the deployment's.
        self.gauges = {
            name: Gauge(
                name,
                help_,
                registry=registry,
                multiprocess_mode="livemax" if name.endswith("_max") else "livesum",
            )
            for name, help_ in GAUGES.items()
        }
        if multi:
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            assert registry is not None
            self.registry = registry

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Record a finished HTTP request: its endpoint, status and latency."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        """Record the time from a request's admission to its first generated token."""
        self.ttft.labels(endpoint).observe(seconds)

    def render(self, gauges: Mapping[str, float]) -> bytes:
        """The exposition text, with the gauges set to ``gauges`` (name to value) first."""
        for name, value in gauges.items():
            self.gauges[name].set(value)
        return generate_latest(self.registry)
