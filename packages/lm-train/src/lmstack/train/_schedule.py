"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, decay: str = "cosine", min_ratio: float = 0.1
) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Args:
        step: Steps already taken.
        total_steps: Steps of the whole run.
        warmup_steps: Steps of linear warmup from ~0 to the peak.
        decay: ``cosine``, ``linear`` or ``constant`` after warmup.
        min_ratio: The floor reached at the last step, as a fraction of the peak.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r} (use cosine, linear or constant)")
    return min_ratio + (1.0 - min_ratio) * shape
