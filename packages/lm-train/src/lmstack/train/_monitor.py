"""What a run reports besides metrics.jsonl: TensorBoard scalars and the process's peak memory.

TensorBoard is optional (``pip install 'lmstack-train[tensorboard]'``). Scalars go to
``<run>/tensorboard/`` from rank 0, one point per optimizer step, under ``train/<metric>``. A
resumed run opens a new event file in the same directory with ``purge_step`` set to its first step,
so TensorBoard drops the points a killed run logged after its last checkpoint and the curve
continues without duplicates.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from lmstack.train.data._errors import TrainError

__all__ = [
    "SCALARS",
    "ScalarWriter",
    "open_tensorboard",
    "peak_memory",
    "tensorboard_available",
    "use_tensorboard",
]

logger = logging.getLogger(__name__)

#: The metrics.jsonl fields written to TensorBoard, each as ``train/<name>``.
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "padding_ratio")


class ScalarWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` the loop uses."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _summary_writer_class() -> Any:
    """``SummaryWriter``, or None when TensorBoard is not importable."""
    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard needs the real package
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except ImportError:
        return None


def tensorboard_available() -> bool:
    """Whether TensorBoard logging can run here (``tensorboard`` is installed)."""
    return _summary_writer_class() is not None


def use_tensorboard(setting: bool | None) -> bool:
    """Whether the run logs to TensorBoard (``run.tensorboard``, checked on every rank).

    Args:
        setting: None logs when TensorBoard is installed, True requires it, False turns it off.

    Raises:
        TrainError: ``setting`` is True and TensorBoard is not installed.
    """
    if setting is False:
        return False
    if tensorboard_available():
        return True
    if setting:
        raise TrainError(
            "run.tensorboard is true but TensorBoard is not installed in "
            f"{sys.prefix}: run `pip install tensorboard` (or `pip install 'lmstack-train[tensorboard]'`), "
            "or set run.tensorboard to false."
        )
    logger.debug("tensorboard is not installed; logging to metrics.jsonl only")
    return False


def open_tensorboard(log_dir: Path, *, purge_step: int | None = None) -> ScalarWriter:
    """Open a TensorBoard writer on ``log_dir`` (call :func:`use_tensorboard` first).

    Args:
        log_dir: Where the event files go (created).
        purge_step: A resumed run's first step: TensorBoard drops older points from this step on.
    """
    writer_cls = _summary_writer_class()
    if writer_cls is None:  # checked by use_tensorboard; uninstalled since?
        raise TrainError("TensorBoard is no longer importable; run `pip install tensorboard`.")
    log_dir.mkdir(parents=True, exist_ok=True)
    writer: ScalarWriter = writer_cls(log_dir=str(log_dir), purge_step=purge_step)
    logger.info("logging to TensorBoard in %s", log_dir)
    return writer


def peak_memory(device: torch.device) -> tuple[int, str]:
    """This process's peak memory in bytes, and what was measured.

    On CUDA, the most memory torch's allocator held for tensors (``torch.cuda.max_memory_allocated``);
    elsewhere the process's peak resident set size (``getrusage``), which includes Python and torch
    themselves. ``(0, "unknown")`` where neither can be read.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return 0, "unknown"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024), "process peak RSS"
