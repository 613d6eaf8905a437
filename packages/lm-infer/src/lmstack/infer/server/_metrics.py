"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated from the server's event loop only, so they need no lock; gauges
(queue length, running sequences, KV blocks) are read from the engine when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Whole-request latency: from tens of milliseconds (a short completion) to minutes (a long one).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token: queueing plus prefill.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds.

    Attributes:
        bounds: The buckets' upper bounds, increasing (``+Inf`` is implied).
        counts: Observations per bucket (not cumulative; the last one is ``+Inf``'s).
        total: Sum of the observed values.
    """

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, labels: Mapping[str, str]) -> Iterable[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` sample lines."""
        running = 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += count
            yield f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}"
        yield f"{name}_sum{_labels(labels)} {_number(self.total)}"
        yield f"{name}_count{_labels(labels)} {running}"


class Metrics:
    """The server's counters and histograms, rendered with live gauges by :meth:`render`."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Record a finished HTTP request: its endpoint, status and latency."""
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        """Record the time from a request's admission to its first generated token."""
        self.ttft.setdefault(endpoint, Histogram(TTFT_BUCKETS)).observe(seconds)

    def render(self, gauges: Sequence[tuple[str, str, float]]) -> str:
        """The exposition text: the counters, ``gauges`` (``(name, help, value)``) and the histograms."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        family("lmstack_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
        for (endpoint, status), count in sorted(self.requests.items()):
            out.append(f"lmstack_requests_total{_labels({'endpoint': endpoint, 'status': status})} {count}")
        family("lmstack_prompt_tokens_total", "counter", "Prompt tokens submitted to the engine.")
        out.append(f"lmstack_prompt_tokens_total {self.prompt_tokens}")
        family("lmstack_generation_tokens_total", "counter", "Tokens generated.")
        out.append(f"lmstack_generation_tokens_total {self.generation_tokens}")
        for name, help_, value in gauges:
            family(name, "gauge", help_)
            out.append(f"{name} {_number(value)}")
        family("lmstack_request_latency_seconds", "histogram", "Time from request to end of response.")
        for endpoint, hist in sorted(self.latency.items()):
            out.extend(hist.lines("lmstack_request_latency_seconds", {"endpoint": endpoint}))
        family("lmstack_time_to_first_token_seconds", "histogram", "Time from admission to first token.")
        for endpoint, hist in sorted(self.ttft.items()):
            out.extend(hist.lines("lmstack_time_to_first_token_seconds", {"endpoint": endpoint}))
        return "\n".join(out) + "\n"
