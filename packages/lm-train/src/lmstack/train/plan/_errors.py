"""The planner's error."""

from __future__ import annotations

from lmstack.train.data._errors import TrainConfigError

__all__ = ["PlanError"]


class PlanError(TrainConfigError):
    """A planner input is invalid (unknown preset, bad cluster spec) or no layout can run it."""
