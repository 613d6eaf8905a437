"""A run's outputs: ``results.json``, ``results.md`` and ``samples/<task>.jsonl``.

``results.json`` (what ``lmstack eval compare`` reads)::

    {"lmstack_eval_version": "0.1.0",
     "model": {"name": ..., "fingerprint": ..., "kind": "local" | "remote" | "custom"},
     "created": "2025-01-01T00:00:00+00:00",
     "config": {...the run's options...},
     "versions": {"lmstack-eval": ..., "lmstack-infer": ..., "python": ..., "torch": ...},
     "tasks": {NAME: {"metrics": {METRIC: {"value", "stderr", "n", "higher_is_better"}},
                      "num_docs", "prompt_hash", "output_type", "num_fewshot", "config": {...}}},
     "groups": {NAME: {"members": [...], "metrics": {METRIC: {..., "weighting": "micro" | "macro"}}}},
     "cache": {"hits": ..., "misses": ...}}

Every file is written atomically, samples first and ``results.json`` last, so a directory with a
``results.json`` holds a complete run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.core import atomic_write_file

if TYPE_CHECKING:
    from lmstack.eval._api import EvalResult, MetricValue

__all__ = ["results_dict", "results_markdown", "write_results"]


def _json_number(value: float | None) -> float | None:
    # JSON has no NaN or infinity: an undefined stderr is null.
    return None if value is None or not math.isfinite(value) else value


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def _metric_dict(m: MetricValue) -> dict[str, Any]:
    return {
        "value": _json_number(m.value),
        "stderr": _json_number(m.stderr),
        "n": m.n,
        "higher_is_better": m.higher_is_better,
    }


def results_dict(result: EvalResult) -> dict[str, Any]:
    """The ``results.json`` document of a run."""
    tasks = {}
    for name, task in result.tasks.items():
        tasks[name] = {
            "metrics": {metric: _metric_dict(m) for metric, m in task.metrics.items()},
            "num_docs": task.num_docs,
            "prompt_hash": task.prompt_hash,
            "output_type": task.output_type,
            "num_fewshot": task.num_fewshot,
            "config": task.config,
        }
    return {
        "lmstack_eval_version": result.versions.get("lmstack-eval"),
        "model": {
            "name": result.model.name,
            "fingerprint": result.model.fingerprint,
            "kind": result.model.kind,
        },
        "created": result.created,
        "config": result.config,
        "versions": result.versions,
        "tasks": tasks,
        "groups": {
            name: {
                "members": list(group.members),
                "metrics": {
                    metric: {**_metric_dict(m), "weighting": group.weighting[metric]}
                    for metric, m in group.metrics.items()
                },
            }
            for name, group in result.groups.items()
        },
        "cache": {"hits": result.cache.hits, "misses": result.cache.misses},
    }


def results_markdown(result: EvalResult) -> str:
    """A Markdown table of a run: one row per task and metric, value ± standard error."""
    lines = [
        f"# {result.model.name}",
        "",
        f"fingerprint `{result.model.fingerprint[:16]}` ({result.model.kind}), {result.created}",
        "",
        "| task | metric | value | ± stderr | n | |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, task in result.tasks.items():
        lines.extend(_row(name, metric, m) for metric, m in task.metrics.items())
    if result.groups:
        lines += ["", "| group | metric | value | ± stderr | n | |", "|---|---|---:|---:|---:|---|"]
        for name, group in result.groups.items():
            lines.extend(
                _row(f"{name} ({group.weighting[metric]})", metric, m) for metric, m in group.metrics.items()
            )
    lines += ["", f"cache: {result.cache.hits} hits, {result.cache.misses} misses", ""]
    return "\n".join(lines)


def _row(name: str, metric: str, m: MetricValue) -> str:
    stderr = _format(m.stderr) if m.stderr is not None and math.isfinite(m.stderr) else "n/a"
    arrow = "↑" if m.higher_is_better else "↓"
    return f"| {name} | {metric} | {_format(m.value)} | {stderr} | {m.n} | {arrow} |"


def write_results(result: EvalResult, output_dir: str | Path) -> Path:
    """Write a run's outputs into ``output_dir`` (created); returns the ``results.json`` path."""
    out = Path(output_dir)
    for name, task in result.tasks.items():
        lines = "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in task.samples)
        atomic_write_file(out / "samples" / f"{name.replace('/', '__')}.jsonl", lines)
    atomic_write_file(out / "results.md", results_markdown(result))
    text = json.dumps(results_dict(result), indent=2, ensure_ascii=False, default=str) + "\n"
    return atomic_write_file(out / "results.json", text)
