"""Reports people look at: runs compared side by side, bar charts, needle-in-a-haystack heatmaps.

* :func:`compare_runs`: a Markdown table of models x (task, metric) from runs' ``results.json``, with
  standard errors, marks where the runs did not ask the same thing, and an optional bar chart PNG
  (``lmstack eval compare RUN_DIR...``).
* :func:`write_results` (with :func:`results_dict` and :func:`results_markdown`): a run's
  ``results.json``, ``results.md`` and per-sample logs, as the runner writes them.
* :func:`needle_table` and :func:`plot_needle`: a needle grid (depth x context length) as a Markdown
  table and an annotated heatmap PNG.

Plots need matplotlib, from the ``plots`` extra (``pip install 'lmstack-eval[plots]'``); it is
imported only when a plot is drawn.
"""

from __future__ import annotations

from lmstack.eval.report._common import ReportError
from lmstack.eval.report._compare import MetricCell, RunResults, compare_runs, load_run, plot_runs
from lmstack.eval.report._needle import NeedleGridLike, needle_table, plot_needle
from lmstack.eval.report._results import results_dict, results_markdown, write_results

__all__ = [
    "MetricCell",
    "NeedleGridLike",
    "ReportError",
    "RunResults",
    "compare_runs",
    "load_run",
    "needle_table",
    "plot_needle",
    "plot_runs",
    "results_dict",
    "results_markdown",
    "write_results",
]
