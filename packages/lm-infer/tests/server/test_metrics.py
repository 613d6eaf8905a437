"""/metrics: valid Prometheus text, and counters, gauges and histograms that move as requests go by."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict

import httpx
import pytest

from lmstack.infer.server._metrics import GAUGES, Metrics

MODEL = "tiny"
COMPLETIONS = 'lmstack_requests_total{endpoint="/v1/completions",status="200"}'


def _families(text: str) -> dict[str, str]:
    """Check the exposition's structure; return each family's type."""
    types: dict[str, str] = {}
    helped: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped, f"two HELP lines for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram")
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
        else:
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"sample {name} before its TYPE line"
            if types[family] == "counter":
                assert name.endswith("_total")
    return types


def _histograms(samples: dict[str, float], name: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, value in samples.items():
        match = re.fullmatch(rf'{name}_bucket\{{endpoint="([^"]*)",le="([^"]*)"\}}', key)
        if match:
            series[match.group(1)].append((float(match.group(2)), value))
    return series


def test_metrics_are_valid_prometheus_text(live) -> None:
    with live.http() as client:
        client.post("/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 2})
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    types = _families(response.text)
    assert types["lmstack_requests_total"] == "counter"
    assert types["lmstack_request_latency_seconds"] == "histogram"
    assert types["lmstack_time_to_first_token_seconds"] == "histogram"
    for gauge in ("lmstack_seqs_waiting", "lmstack_seqs_running", "lmstack_kv_blocks_used",
                  "lmstack_kv_blocks_total", "lmstack_requests_in_flight"):  # fmt: skip
        assert types[gauge] == "gauge"
    samples = live.metrics()
    for name in ("lmstack_request_latency_seconds", "lmstack_time_to_first_token_seconds"):
        for endpoint, buckets in _histograms(samples, name).items():
            buckets.sort()
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), "buckets must be cumulative"
            assert buckets[-1][0] == float("inf")
            assert buckets[-1][1] == samples[f'{name}_count{{endpoint="{endpoint}"}}']


def test_metrics_parse_with_the_prometheus_client_parser(live) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    text = httpx.get(f"{live.base_url}/metrics").text
    names = {family.name for family in parser.text_string_to_metric_families(text)}
    assert {"lmstack_requests", "lmstack_kv_blocks_used", "lmstack_request_latency_seconds"} <= names


def test_counters_move_with_requests(live) -> None:
    before = live.metrics()
    with live.http() as client:
        completion = {"model": MODEL, "prompt": "the quick", "max_tokens": 5, "ignore_eos": True}
        ok = client.post("/v1/completions", json=completion)
        bad = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": -1})
        messages = [{"role": "user", "content": "hi"}]
        chat_body = {"model": MODEL, "max_tokens": 3, "ignore_eos": True, "messages": messages}
        chat = client.post("/v1/chat/completions", json=chat_body)
    assert ok.status_code == 200 and bad.status_code == 400 and chat.status_code == 200
    after = live.metrics()

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved(COMPLETIONS) == 1
    assert moved('lmstack_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert moved('lmstack_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    prompt_tokens = ok.json()["usage"]["prompt_tokens"] + chat.json()["usage"]["prompt_tokens"]
    assert moved("lmstack_prompt_tokens_total") == prompt_tokens
    assert moved("lmstack_generation_tokens_total") == 5 + 3
    assert moved('lmstack_time_to_first_token_seconds_count{endpoint="/v1/completions"}') == 1
    assert moved('lmstack_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"}') == 1
    assert moved('lmstack_request_latency_seconds_count{endpoint="/v1/completions"}') == 2
    assert after["lmstack_kv_blocks_used"] == 0
    assert after["lmstack_kv_blocks_total"] == live.llm.engine.num_blocks


def test_gauges_show_running_sequences_and_used_blocks(start_server) -> None:
    with start_server(slow=0.01) as server:
        body = {
            "model": MODEL,
            "prompt": "the",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "n": 3,
        }
        with server.http() as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            during = server.metrics()
        assert during["lmstack_seqs_running"] + during["lmstack_seqs_waiting"] == 3
        assert during["lmstack_kv_blocks_used"] >= 1
        assert during["lmstack_requests_in_flight"] == 1
        server.wait_idle()
        assert server.metrics()["lmstack_kv_blocks_used"] == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, labels), as the prometheus_client parser reads them."""
    parser = pytest.importorskip("prometheus_client.parser")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_histogram_buckets_and_label_escaping() -> None:
    metrics = Metrics()
    endpoint = 'a"b\\c\nd'
    for value in (0.005, 0.5, 500.0):
        metrics.count_request(endpoint, 200, value)
    text = metrics.render(dict.fromkeys(GAUGES, 0)).decode()
    assert 'endpoint="a\\"b\\\\c\\nd"' in text  # escaped as the text format says
    samples = _samples(text)
    assert samples["lmstack_requests_total", (("endpoint", endpoint), ("status", "200"))] == 3

    def bucket(le: str) -> float:
        return samples["lmstack_request_latency_seconds_bucket", (("endpoint", endpoint), ("le", le))]

    assert [bucket("0.01"), bucket("1.0"), bucket("+Inf")] == [1, 2, 3]
    latency_sum = samples["lmstack_request_latency_seconds_sum", (("endpoint", endpoint),)]
    assert latency_sum == pytest.approx(500.505)
    assert all(samples[name, ()] == 0 for name in GAUGES)


def test_two_apps_in_one_process_count_apart() -> None:
    first, second = Metrics(), Metrics()  # one registry each: creating the second does not clash
    first.count_request("/health", 200, 0.01)
    key = ("lmstack_requests_total", (("endpoint", "/health"), ("status", "200")))
    assert _samples(first.render({}).decode())[key] == 1
    assert key not in _samples(second.render({}).decode())


def test_multiprocess_mode_sums_the_processes(tmp_path) -> None:
    # prometheus_client picks its mode when imported: each "worker" is a fresh interpreter.
    worker = (
        "import sys\n"
        "from lmstack.infer.server._metrics import Metrics\n"
        "metrics = Metrics()\n"
        "metrics.count_request('/v1/completions', 200, 0.2)\n"
        "metrics.generation_tokens.inc(5)\n"
        "sys.stdout.write(metrics.render({'lmstack_kv_blocks_total': 8}).decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [
        subprocess.run([sys.executable, "-c", worker], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    assert all(out.returncode == 0 for out in outputs), [out.stderr for out in outputs]
    assert list(tmp_path.glob("*.db")), "nothing was written to PROMETHEUS_MULTIPROC_DIR"
    first, second = (_samples(out.stdout) for out in outputs)
    completions = ("lmstack_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert first[completions] == 1 and second[completions] == 2  # the second sees both processes
    assert second["lmstack_generation_tokens_total", ()] == 10
    assert second["lmstack_request_latency_seconds_count", (("endpoint", "/v1/completions"),)] == 2
