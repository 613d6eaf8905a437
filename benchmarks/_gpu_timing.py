"""CUDA-event timing shared by the GPU benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def time_us(fn: Callable[[], Any], warmup: int = 5, iters: int = 20) -> float:
    """Mean microseconds of ``fn()`` over ``iters`` calls after ``warmup`` ones, timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters
