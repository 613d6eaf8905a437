"""Needle-in-a-haystack reports: a depth x length heatmap (PNG) and the same grid as a Markdown table.

Any object with ``lengths`` (context lengths, in tokens), ``depths`` (where the needle sits: fractions
0..1 of the context, or any numbers) and ``scores`` (a 2-D list ``[depth][length]`` of scores in 0..1,
``None`` or NaN where a cell was not run) will do, so these reports do not depend on the task class
that produced the grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from lmstack.eval.report._common import MISSING, ReportError, new_figure, save_png

__all__ = ["NeedleGridLike", "needle_table", "plot_needle"]


class NeedleGridLike(Protocol):
    """What a needle report reads from a grid."""

    @property
    def lengths(self) -> Sequence[int]:
        """Context lengths in tokens, the columns."""
        ...

    @property
    def depths(self) -> Sequence[float]:
        """Needle depths, the rows."""
        ...

    @property
    def scores(self) -> Sequence[Sequence[float | None]]:
        """``scores[depth][length]`` in 0..1, ``None`` where not run."""
        ...


def _checked(grid: Any) -> tuple[list[Any], list[Any], list[list[float | None]]]:
    """The grid's axes and scores, with missing cells as ``None``.

    Raises:
        ReportError: An attribute is missing, the shape does not match the axes, or a score is off 0..1.
    """
    try:
        lengths, depths, scores = list(grid.lengths), list(grid.depths), [list(row) for row in grid.scores]
    except (AttributeError, TypeError) as err:
        raise ReportError(
            "a needle grid needs lengths, depths and scores[depth][length] sequences; "
            f"{type(grid).__name__}: {err}"
        ) from err
    if not lengths or not depths:
        raise ReportError("a needle grid needs at least one length and one depth")
    if len(scores) != len(depths) or any(len(row) != len(lengths) for row in scores):
        widths = [len(row) for row in scores]
        raise ReportError(
            f"needle scores must be [depth][length], {len(depths)} rows of {len(lengths)}; "
            f"got {len(scores)} rows of {widths}"
        )
    clean: list[list[float | None]] = []
    for d, row in enumerate(scores):
        clean.append([])
        for c, value in enumerate(row):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                clean[-1].append(None)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
                clean[-1].append(float(value))
            else:
                raise ReportError(
                    f"needle score at depth {depths[d]}, length {lengths[c]} is {value!r}; "
                    "scores must be in 0..1"
                )
    return lengths, depths, clean


def _depth_labels(depths: Sequence[Any]) -> list[str]:
    """Fractions as percentages (0.25 -> 25%), anything else as written."""
    if all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths):
        return [f"{d * 100:g}%" for d in depths]
    return [f"{d:g}" if isinstance(d, (int, float)) else str(d) for d in depths]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def needle_table(grid: NeedleGridLike | Any) -> str:
    """The needle grid as a Markdown table: a row per depth, a column per length, with means.

    Args:
        grid: Any object with ``lengths``, ``depths`` and ``scores[depth][length]``.

    Returns:
        The Markdown text; the last column is each depth's mean, the last row each length's.

    Raises:
        ReportError: The grid is malformed (see :func:`plot_needle`).
    """
    lengths, depths, scores = _checked(grid)
    lines = [
        "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " | mean |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for label, row in zip(_depth_labels(depths), scores, strict=True):
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(_mean(row))} |")
    columns = [[row[c] for row in scores] for c in range(len(lengths))]
    overall = _mean([v for row in scores for v in row])
    lines.append("| mean | " + " | ".join(_fmt(_mean(col)) for col in columns) + f" | {_fmt(overall)} |")
    return "\n".join(lines) + "\n"


def plot_needle(
    grid: NeedleGridLike | Any, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write the needle grid as an annotated heatmap PNG: depth down, context length across, 0..1.

    Args:
        grid: Any object with ``lengths``, ``depths`` and ``scores[depth][length]`` (``None`` or NaN
            where a cell was not run; drawn grey).
        path: The PNG to write.
        title: The plot's title (default: "Needle in a haystack").

    Returns:
        ``path``.

    Raises:
        ReportError: The grid lacks an attribute, its scores are not ``[depth][length]`` in shape,
            a score is outside 0..1, or matplotlib is not installed.
    """
    lengths, depths, scores = _checked(grid)
    figure = new_figure(figsize=(1.0 + 0.9 * len(lengths) + 1.5, 1.0 + 0.5 * len(depths) + 1.0))
    ax = figure.subplots()
    from matplotlib import colormaps  # matplotlib is there: new_figure checked

    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    data = [[math.nan if v is None else v for v in row] for row in scores]
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for d, row in enumerate(scores):
        for c, value in enumerate(row):
            # Dark text on the light middle of the colour map, white on its dark ends.
            dark = value is None or 0.2 <= value <= 0.85
            ax.text(
                c, d, _fmt(value), ha="center", va="center", fontsize=9, color="black" if dark else "white"
            )
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels(_depth_labels(depths))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or "Needle in a haystack")
    figure.colorbar(image, ax=ax, label="score")
    return save_png(figure, path)
