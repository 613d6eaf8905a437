"""The metrics' errors: lmstack-eval's :class:`MetricError` and the registry's unknown-name error."""

from __future__ import annotations

from lmstack.eval._errors import MetricError

__all__ = ["MetricError", "UnknownMetricError"]


class UnknownMetricError(MetricError):
    """A metric name is not in the registry.

    Attributes:
        name: The name that was asked for.
        known: The registered names, sorted.
    """

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown metric {name!r}; known metrics: {', '.join(known)} (and pass@<k>)")
        self.name = name
        self.known = known
