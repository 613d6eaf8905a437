"""Reports: compare_runs tables from results.json files, the bar chart, the needle table and heatmap."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmstack.eval.report import ReportError, compare_runs, load_run, needle_table, plot_needle

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metric(value: float | None, stderr: float | None, n: int = 100, higher: bool = True) -> dict[str, Any]:
    return {"value": value, "stderr": stderr, "n": n, "higher_is_better": higher}


def _write_run(root: Path, name: str, tasks: dict[str, Any], fingerprint: str = "f" * 64) -> Path:
    root.mkdir(parents=True)
    results = {
        "model": {"name": name, "fingerprint": fingerprint, "kind": "local"},
        "tasks": tasks,
        "config": {"batch_size": 8},  # other keys are ignored
    }
    (root / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return root


def _task(metrics: dict[str, Any], prompt_hash: str = "hash-1", num_docs: int = 100) -> dict[str, Any]:
    return {"metrics": metrics, "num_docs": num_docs, "prompt_hash": prompt_hash, "fewshot": 0}


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    first = _write_run(
        tmp_path / "run-a",
        "tiny-a",
        {
            "qa": _task({"acc": _metric(0.62, 0.031), "acc_norm": _metric(0.65, 0.03)}),
            "arith": _task({"exact_match": _metric(0.3, 0.04)}, prompt_hash="hash-2"),
            "wiki": _task({"word_perplexity": _metric(23.4, 1.2, higher=False)}),
        },
    )
    second = _write_run(
        tmp_path / "run-b",
        "tiny-b",
        {
            "qa": _task({"acc": _metric(0.55, 0.0312), "acc_norm": _metric(0.7, None)}),
            "arith": _task({"exact_match": _metric(0.45, 0.05)}, prompt_hash="hash-3"),
            "wiki": _task({"word_perplexity": _metric(19.1, 0.9, higher=False)}),
            "needle": _task({"acc": _metric(1.0, 0.0, n=20)}),
        },
    )
    return [first, second]


def test_compare_runs_table(runs: list[Path]) -> None:
    text = compare_runs(runs)
    table = text.split("\n\n")[0].splitlines()
    assert table == [
        "| task | metric | tiny-a | tiny-b |",
        "|---|---|---:|---:|",
        "| qa | acc ↑ | **0.6200** ± 0.0310 | 0.5500 ± 0.0312 |",
        "| qa | acc_norm ↑ | 0.6500 ± 0.0300 | **0.7000** |",
        "| arith | exact_match ↑ | 0.3000 ± 0.0400 † | 0.4500 ± 0.0500 † |",
        "| wiki | word_perplexity ↓ | 23.4000 ± 1.2000 | **19.1000** ± 0.9000 |",
        "| needle | acc ↑ | — | 1.0000 ± 0.0000 |",
    ]
    assert "† arith: the prompt hash differs between runs (tiny-a: `hash-2`, tiny-b: `hash-3`)" in text
    assert "— not in that run." in text
    assert f"- tiny-a: `{runs[0] / 'results.json'}` (model ffffffffffff)" in text


def test_differing_sample_counts_are_marked_and_not_ranked(tmp_path: Path) -> None:
    full = _write_run(tmp_path / "full", "m", {"qa": _task({"acc": _metric(0.5, 0.05, n=100)})})
    limited = _write_run(tmp_path / "limited", "m", {"qa": _task({"acc": _metric(0.9, 0.1, n=10)})})
    text = compare_runs([full, limited / "results.json"])
    # Two runs of one model: the run directory tells the columns apart.
    assert "| task | metric | m (full) | m (limited) |" in text
    assert "| qa | acc ↑ | 0.5000 ± 0.0500 ‡ | 0.9000 ± 0.1000 ‡ |" in text
    assert "‡ qa / acc: different sample counts (m (full): 100, m (limited): 10)." in text
    assert "**" not in text and "—" not in text


def test_same_name_same_directory_name_are_numbered(tmp_path: Path) -> None:
    one = _write_run(tmp_path / "x" / "out", "m", {"t": _task({"acc": _metric(0.5, None)})})
    two = _write_run(tmp_path / "y" / "out", "m", {"t": _task({"acc": _metric(0.5, None)})})
    assert "| task | metric | m (out) #1 | m (out) #2 |" in compare_runs([one, two])


def test_names_with_pipes_are_escaped(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", "a|b", {"t": _task({"acc": _metric(0.25, None)})})
    assert "| task | metric | a\\|b |" in compare_runs([run])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON \\(line 1"),
        (json.dumps({"tasks": {}}), "has no 'model'"),
        (json.dumps({"model": {"name": "m"}, "tasks": {"t": {}}}), "tasks.t has no 'metrics'"),
        (json.dumps({"model": {"name": "m"}, "tasks": {"t": {"metrics": {"acc": {"value": "high"}}}}}),
         "tasks.t.metrics.acc.value is 'high', not a number"),
        (json.dumps({"model": {"name": 3}, "tasks": {}}), "model.name is 3, not a string"),
    ],
)  # fmt: skip
def test_bad_results_are_clear_errors(tmp_path: Path, content: str | None, match: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(ReportError, match=match):
        compare_runs([run])
    assert not list(tmp_path.glob("*.png"))


def test_no_runs_is_an_error() -> None:
    with pytest.raises(ReportError, match="at least one run"):
        compare_runs([])


def test_load_run_reads_cells(runs: list[Path]) -> None:
    run = load_run(runs[1])
    assert run.name == "tiny-b"
    assert run.prompt_hashes["arith"] == "hash-3"
    cell = run.metrics["wiki"]["word_perplexity"]
    assert (cell.value, cell.stderr, cell.n, cell.higher_is_better) == (19.1, 0.9, 100, False)


def _read_png(path: Path) -> Any:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return image.imread(path)


def test_compare_runs_writes_a_bar_chart(runs: list[Path], tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "compare.png"
    text = compare_runs(runs, plot=plot)
    assert text == compare_runs(runs)  # the plot does not change the table
    pixels = _read_png(plot)
    height, width, channels = pixels.shape
    # One panel per metric (acc, acc_norm, exact_match, word_perplexity) stacked: a tall image.
    assert channels in (3, 4) and width >= 400 and height > 2 * width
    assert not list(plot.parent.glob(".*tmp*"))  # written atomically, nothing left beside it


def test_missing_matplotlib_names_the_extra(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ReportError, match=r"lmstack-eval\[plots\]"):
        compare_runs(runs, plot=tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    assert "| qa | acc ↑ |" in compare_runs(runs)  # the table needs no matplotlib


# -- needle in a haystack -------------------------------------------------------------------------------
@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]
    scores: list[list[float | None]]


GRID = Grid(
    lengths=[128, 256, 512],
    depths=[0.0, 0.5, 1.0],
    scores=[[1.0, 1.0, 0.5], [1.0, 0.25, None], [0.75, 0.5, 0.0]],
)


def test_needle_table() -> None:
    assert needle_table(GRID).splitlines() == [
        "| depth \\ length | 128 | 256 | 512 | mean |",
        "|---|---:|---:|---:|---:|",
        "| 0% | 1.00 | 1.00 | 0.50 | 0.83 |",
        "| 50% | 1.00 | 0.25 | — | 0.62 |",
        "| 100% | 0.75 | 0.50 | 0.00 | 0.42 |",
        "| mean | 0.92 | 0.58 | 0.25 | 0.62 |",
    ]


def test_needle_table_depths_that_are_not_fractions() -> None:
    grid = Grid(lengths=[100], depths=[10, 90], scores=[[1], [float("nan")]])
    assert needle_table(grid).splitlines()[2:] == [
        "| 10 | 1.00 | 1.00 |",
        "| 90 | — | — |",
        "| mean | 1.00 | 1.00 |",
    ]


def test_plot_needle_writes_a_heatmap(tmp_path: Path) -> None:
    path = plot_needle(GRID, tmp_path / "needle.png", title="tiny")
    assert path == tmp_path / "needle.png"
    height, width, _ = _read_png(path).shape
    assert width > height > 100


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        (Grid([1, 2], [0.0], [[1.0]]), "1 rows of 2; got 1 rows of \\[1\\]"),
        (Grid([1], [0.0, 1.0], [[1.0]]), "2 rows of 1"),
        (Grid([1], [0.0], [[1.5]]), "depth 0.0, length 1 is 1.5; scores must be in 0..1"),
        (Grid([], [], []), "at least one length"),
        (object(), "needs lengths, depths and scores"),
    ],
)
def test_bad_needle_grids_are_clear_errors(grid: Any, match: str, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=match):
        needle_table(grid)
    with pytest.raises(ReportError, match=match):
        plot_needle(grid, tmp_path / "n.png")
    assert not (tmp_path / "n.png").exists()
