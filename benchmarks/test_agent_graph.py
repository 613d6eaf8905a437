"""The graph search agent's concurrency and its own overhead (issue 13).

A plan of width w (w independent nodes, see _agent_workload) over a scripted LLM whose every call
takes a fixed 50 ms, run with ``concurrency=w`` against the same plan with ``concurrency=1``: the
node phase (first node started to last node answered) should be close to w times faster, and the
whole run (planner and final answer included, which no concurrency can shorten) correspondingly
less. The framework's overhead per node is the wall time beyond the injected latency on the critical
path, per node, measured with the 50 ms latency and with none (goal: under 5 ms).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _agent_workload as wl

WIDTHS = (2, 4, 8)
LATENCY_S = 0.05
ROUNDS = 3  # each configuration runs this many times; the median counts
OVERHEAD_WIDTHS = (8, 32)
GOAL_OVERHEAD_S = 0.005


def _median(width: int, latency_s: float, concurrency: int) -> wl.Measurement:
    runs = sorted((wl.run(width, latency_s, concurrency) for _ in range(ROUNDS)), key=lambda m: m.wall_s)
    return runs[len(runs) // 2]


@pytest.mark.benchmark
def test_graph_search_speedup_and_overhead(benchmark: Any) -> None:
    results: dict[str, wl.Measurement] = {}

    def run() -> None:
        wl.run(2, 0.0, 2)  # warm-up: imports, first thread pool
        for width in WIDTHS:
            results[f"w{width}-parallel"] = _median(width, LATENCY_S, width)
            results[f"w{width}-sequential"] = _median(width, LATENCY_S, 1)
        for width in OVERHEAD_WIDTHS:
            results[f"w{width}-zero-latency"] = _median(width, 0.0, width)

    benchmark.pedantic(run, rounds=1, iterations=1)
    lines = [
        f"scripted LLM latency {LATENCY_S * 1000:.0f} ms a call; median of {ROUNDS} runs",
        f"{'plan':>18} {'wall s':>8} {'nodes s':>8} {'crit. latency s':>15} {'overhead/node ms':>16}",
    ]
    for name, m in results.items():
        lines.append(
            f"{name:>18} {m.wall_s:8.3f} {m.nodes_s:8.3f} {m.critical_latency_s:15.3f} "
            f"{m.overhead_per_node_s * 1000:16.2f}"
        )
        benchmark.extra_info[f"{name}_wall_s"] = round(m.wall_s, 4)
        benchmark.extra_info[f"{name}_overhead_per_node_ms"] = round(m.overhead_per_node_s * 1000, 3)
    lines.append("")
    for width in WIDTHS:
        par, seq = results[f"w{width}-parallel"], results[f"w{width}-sequential"]
        nodes_speedup = seq.nodes_s / par.nodes_s
        wall_speedup = seq.wall_s / par.wall_s
        ideal_wall = wl.critical_path_calls(width, 1) / wl.critical_path_calls(width, width)
        benchmark.extra_info[f"w{width}_nodes_speedup"] = round(nodes_speedup, 2)
        benchmark.extra_info[f"w{width}_wall_speedup"] = round(wall_speedup, 2)
        lines.append(
            f"width {width}: node phase {nodes_speedup:.2f}x faster (ideal {width}x); whole run "
            f"{wall_speedup:.2f}x (ideal {ideal_wall:.2f}x: the planner and the final answer are sequential)"
        )
        assert nodes_speedup >= 0.75 * width, (width, nodes_speedup)
    overheads = [results[f"w{w}-zero-latency"].overhead_per_node_s for w in OVERHEAD_WIDTHS]
    latency_overheads = [results[f"w{w}-parallel"].overhead_per_node_s for w in WIDTHS]
    benchmark.extra_info["overhead_per_node_ms_zero_latency"] = round(statistics.mean(overheads) * 1000, 3)
    lines.append(
        f"framework overhead per node: {statistics.mean(overheads) * 1000:.2f} ms with no latency, "
        f"{statistics.mean(latency_overheads) * 1000:.2f} ms with {LATENCY_S * 1000:.0f} ms latency "
        f"(goal < {GOAL_OVERHEAD_S * 1000:.0f} ms)"
    )
    print("\n" + "\n".join(lines))
    assert max(overheads) < GOAL_OVERHEAD_S, overheads
