"""What the report modules share: their error, number formatting, and matplotlib on demand.

matplotlib is an optional dependency (the ``plots`` extra): it is imported only when a plot is asked
for, and drawn on an Agg canvas of the figure's own, so a report never touches pyplot's global state
(the user's backend, open figures). A PNG is written atomically: the old file or the whole new one.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.core import atomic_write_file
from lmstack.eval._errors import EvalError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MISSING", "ReportError", "format_number", "new_figure", "save_png"]

MISSING = "—"
"""What a table shows where a run has no value."""


class ReportError(EvalError, ValueError):
    """A report could not be made: a run without results.json, a malformed file, matplotlib missing."""


def format_number(value: float) -> str:
    """Four decimals, or four significant digits when that would be unreadably long."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib figure on its own Agg canvas.

    Raises:
        ReportError: matplotlib is not installed (it comes with the ``plots`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ReportError(
            "plots need matplotlib, which is not installed; install lmstack-eval's plots extra: "
            "pip install 'lmstack-eval[plots]'"
        ) from err
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG at ``path``, all at once (parent directories are created)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_file(path, buffer.getvalue())
