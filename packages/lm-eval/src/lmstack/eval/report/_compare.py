"""Side-by-side comparison of evaluation runs: a Markdown table and a grouped bar chart.

Each run directory holds the ``results.json`` that the runner writes::

    {"model": {"name", "fingerprint", "kind"},
     "tasks": {TASK: {"metrics": {METRIC: {"value", "stderr", "n", "higher_is_better"}},
                      "num_docs", "prompt_hash", ...}}, ...}

The table has a row per (task, metric) and a column per run, as OpenCompass's summaries do, so that
it stays readable with many tasks. A score is only comparable with another if both runs asked the same
thing: cells of a task whose ``prompt_hash`` differs between runs are marked, and so are cells whose
sample counts differ (a ``--limit`` or a shard); the best comparable value of a row is in bold.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.eval.report._common import MISSING, ReportError, format_number, new_figure, save_png

__all__ = ["MetricCell", "RunResults", "compare_runs", "load_run", "plot_runs"]

RESULTS_FILE = "results.json"
HASH_MARK = "†"
COUNT_MARK = "‡"


@dataclass(frozen=True)
class MetricCell:
    """One metric of one task in one run.

    Attributes:
        value: The score, or ``None`` when the run recorded none.
        stderr: Its standard error, if known.
        n: How many samples it aggregates, if known.
        higher_is_better: Which direction is better.
    """

    value: float | None
    stderr: float | None
    n: int | None
    higher_is_better: bool


@dataclass(frozen=True)
class RunResults:
    """What a report needs from one run's ``results.json``.

    Attributes:
        path: The run's results file.
        name: The model's name.
        fingerprint: The model's fingerprint (``""`` if the file has none).
        metrics: ``{task: {metric: cell}}`` in the file's order.
        prompt_hashes: ``{task: prompt_hash}`` for the tasks that record one.
    """

    path: Path
    name: str
    fingerprint: str
    metrics: dict[str, dict[str, MetricCell]]
    prompt_hashes: dict[str, str]


def _field(mapping: Any, key: str, where: str, path: Path, kind: type) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise ReportError(f"{path}: {where} has no {key!r}; is this a results.json written by lmstack eval?")
    value = mapping[key]
    if not isinstance(value, kind):
        raise ReportError(
            f"{path}: {where}.{key} is {value!r}, not a {'JSON object' if kind is Mapping else 'string'}"
        )
    return value


def _number(value: Any, where: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{path}: {where} is {value!r}, not a number or null")
    return float(value)


def _cell(raw: Any, where: str, path: Path) -> MetricCell:
    if not isinstance(raw, Mapping):
        raise ReportError(f"{path}: {where} is {raw!r}, not an object with value and stderr")
    n = raw.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise ReportError(f"{path}: {where}.n is {n!r}, not an integer")
    higher = raw.get("higher_is_better", True)
    if not isinstance(higher, bool):
        raise ReportError(f"{path}: {where}.higher_is_better is {higher!r}, not true or false")
    return MetricCell(
        value=_number(raw.get("value"), f"{where}.value", path),
        stderr=_number(raw.get("stderr"), f"{where}.stderr", path),
        n=n,
        higher_is_better=higher,
    )


def load_run(run_dir: str | os.PathLike[str]) -> RunResults:
    """Read one run's ``results.json`` (``run_dir`` may also be the file itself).

    Raises:
        ReportError: The file is missing, is not JSON, or lacks the fields a report needs.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ReportError(f"{path} does not exist; give the output directory of an `lmstack eval` run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read: {err}") from err
    model = _field(data, "model", "the file", path, Mapping)
    name = _field(model, "name", "model", path, str)
    fingerprint = model.get("fingerprint") or ""
    tasks = _field(data, "tasks", "the file", path, Mapping)
    metrics: dict[str, dict[str, MetricCell]] = {}
    hashes: dict[str, str] = {}
    for task, entry in tasks.items():
        raw_metrics = _field(entry, "metrics", f"tasks.{task}", path, Mapping)
        metrics[task] = {m: _cell(raw, f"tasks.{task}.metrics.{m}", path) for m, raw in raw_metrics.items()}
        if entry.get("prompt_hash") is not None:
            hashes[task] = str(entry["prompt_hash"])
    return RunResults(
        path=path, name=name, fingerprint=str(fingerprint), metrics=metrics, prompt_hashes=hashes
    )


def _labels(runs: Sequence[RunResults]) -> list[str]:
    """Column names: the model's name, with the run directory added where two runs share a name."""
    names = [r.name for r in runs]
    labels = [
        n if names.count(n) == 1 else f"{n} ({r.path.parent.name})" for n, r in zip(names, runs, strict=True)
    ]
    # Still ambiguous (same model, same directory name): number them.
    return [
        lab if labels.count(lab) == 1 else f"{lab} #{labels[:i].count(lab) + 1}"
        for i, lab in enumerate(labels)
    ]


def _rows(runs: Sequence[RunResults]) -> list[tuple[str, str]]:
    """Every (task, metric) any run has, in order of first appearance."""
    rows: dict[tuple[str, str], None] = {}
    for run in runs:
        for task, metrics in run.metrics.items():
            for metric in metrics:
                rows[(task, metric)] = None
    return list(rows)


def _hash_mismatches(runs: Sequence[RunResults]) -> dict[str, list[tuple[int, str]]]:
    """Tasks whose prompt hash differs between the runs that have them: ``{task: [(run, hash)]}``."""
    out = {}
    for task in {t for r in runs for t in r.prompt_hashes}:
        seen = [(i, r.prompt_hashes[task]) for i, r in enumerate(runs) if task in r.prompt_hashes]
        if len({h for _, h in seen}) > 1:
            out[task] = seen
    return out


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class _Row:
    task: str
    metric: str
    cells: list[MetricCell | None]
    hash_differs: bool

    @property
    def higher_is_better(self) -> bool:
        return next((c.higher_is_better for c in self.cells if c is not None), True)

    @property
    def counts_differ(self) -> bool:
        return len({c.n for c in self.cells if c is not None and c.value is not None}) > 1

    def best(self) -> float | None:
        values = [c.value for c in self.cells if c is not None and c.value is not None]
        if len(values) < 2 or self.hash_differs or self.counts_differ:
            return None  # nothing to rank, or not comparable
        return max(values) if self.higher_is_better else min(values)


def _table_rows(runs: Sequence[RunResults]) -> tuple[list[_Row], dict[str, list[tuple[int, str]]]]:
    mismatches = _hash_mismatches(runs)
    rows = [
        _Row(task, metric, [r.metrics.get(task, {}).get(metric) for r in runs], task in mismatches)
        for task, metric in _rows(runs)
    ]
    return rows, mismatches


def _format_cell(cell: MetricCell | None, row: _Row, best: float | None) -> str:
    if cell is None or cell.value is None:
        return MISSING
    text = format_number(cell.value)
    if best is not None and cell.value == best:
        text = f"**{text}**"
    if cell.stderr is not None:
        text += f" ± {format_number(cell.stderr)}"
    marks = (HASH_MARK if row.hash_differs else "") + (COUNT_MARK if row.counts_differ else "")
    return text + (f" {marks}" if marks else "")


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]], *, plot: str | os.PathLike[str] | None = None
) -> str:
    """A Markdown table comparing evaluation runs side by side, and optionally a bar chart of it.

    Rows are (task, metric), columns are the runs' models; a cell is ``value ± stderr``, the best
    comparable value of a row in bold. ``†`` marks the cells of a task whose prompt hash differs
    between runs (they did not ask the same thing), ``‡`` a metric whose sample counts differ, and
    ``—`` a task or metric a run does not have. Footnotes under the table say which.

    Args:
        run_dirs: Output directories of ``lmstack eval`` runs (or their ``results.json`` files).
        plot: Where to write a grouped bar chart (PNG) of the same numbers, with error bars.

    Returns:
        The Markdown text.

    Raises:
        ReportError: No runs, a run without a readable ``results.json``, or ``plot`` asked for without
            matplotlib installed.
    """
    if not run_dirs:
        raise ReportError("compare_runs needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    rows, mismatches = _table_rows(runs)
    lines = [
        "| task | metric | " + " | ".join(_escape(lab) for lab in labels) + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    for row in rows:
        arrow = "↑" if row.higher_is_better else "↓"
        best = row.best()
        cells = [_format_cell(cell, row, best) for cell in row.cells]
        lines.append(f"| {_escape(row.task)} | {_escape(row.metric)} {arrow} | " + " | ".join(cells) + " |")
    notes = []
    for task in sorted(mismatches):
        seen = ", ".join(f"{labels[i]}: `{h[:12]}`" for i, h in mismatches[task])
        notes.append(
            f"{HASH_MARK} {task}: the prompt hash differs between runs ({seen}); not the same prompts."
        )
    for row in rows:
        if row.counts_differ:
            counts = ", ".join(
                f"{lab}: {c.n}" for lab, c in zip(labels, row.cells, strict=True) if c is not None
            )
            notes.append(f"{COUNT_MARK} {row.task} / {row.metric}: different sample counts ({counts}).")
    if any(c is None or c.value is None for row in rows for c in row.cells):
        notes.append(f"{MISSING} not in that run.")
    runs_list = [f"- {_escape(lab)}: `{r.path}`" + (f" (model {r.fingerprint[:12]})" if r.fingerprint else "")
                 for lab, r in zip(labels, runs, strict=True)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    text += "\nRuns:\n" + "\n".join(runs_list) + "\n"
    if plot is not None:
        plot_runs(runs, plot, labels=labels)
    return text


def plot_runs(
    runs: Sequence[RunResults], path: str | os.PathLike[str], *, labels: Sequence[str] | None = None
) -> Path:
    """A grouped bar chart of runs' scores with standard-error bars, one panel per metric.

    Each panel groups the bars by task, one bar per run; metrics get their own panels because their
    scales differ (accuracy against perplexity). Tasks whose prompt hash differs between runs are
    marked ``†`` in the axis labels.

    Args:
        runs: The loaded runs (:func:`load_run`).
        path: The PNG to write.
        labels: Legend names, one per run (default: the models' names, made unique).

    Returns:
        ``path``.

    Raises:
        ReportError: matplotlib is not installed, or there is nothing to plot.
    """
    labels = list(labels) if labels is not None else _labels(runs)
    rows, mismatches = _table_rows(runs)
    panels: dict[str, list[_Row]] = {}
    for row in rows:
        if any(c is not None and c.value is not None for c in row.cells):
            panels.setdefault(row.metric, []).append(row)
    if not panels:
        raise ReportError("the runs have no metric values to plot")
    widest = max(len(p) for p in panels.values())
    figure = new_figure(figsize=(max(6.0, 1.1 * widest * max(1, len(runs)) ** 0.5 + 2), 3.2 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    width = 0.8 / len(runs)
    for ax, (metric, metric_rows) in zip(axes, panels.items(), strict=True):
        for j, label in enumerate(labels):
            xs, heights, errors = [], [], []
            for x, row in enumerate(metric_rows):
                cell = row.cells[j]
                if cell is not None and cell.value is not None and math.isfinite(cell.value):
                    xs.append(x - 0.4 + width * (j + 0.5))
                    heights.append(cell.value)
                    errors.append(cell.stderr or 0.0)
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=label, color=f"C{j % 10}")
        ax.set_xlim(-0.6, len(metric_rows) - 0.4)  # every group keeps its slots, present or not
        ax.set_xticks(range(len(metric_rows)))
        ax.set_xticklabels([r.task + (f" {HASH_MARK}" if r.task in mismatches else "") for r in metric_rows])
        direction = "higher" if metric_rows[0].higher_is_better else "lower"
        ax.set_title(f"{metric} ({direction} is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, 1.35), ncol=min(len(labels), 4), frameon=False)
    figure.tight_layout()
    return save_png(figure, path)
