"""The gate's classifier: standardised features, L2-penalised logistic regression fit by Newton's method."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import GateError

__all__ = ["GateModel", "fit_logistic", "sigmoid", "standardize"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large ``|z|``."""
    return np.exp(-np.logaddexp(0.0, -z))


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales (standard deviations; 1 where a column is constant)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def _objective(xb: np.ndarray, y: np.ndarray, beta: np.ndarray, penalty: np.ndarray) -> float:
    z = xb @ beta
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * beta * beta))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, *, l2: float, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """Minimise the negative log-likelihood plus ``l2 / 2 * |w|^2`` (the bias is not penalised).

    Newton's method (iteratively reweighted least squares) with a backtracking step, so it converges
    also on separable data, where the penalty keeps the optimum finite.

    Args:
        x: Features, shape ``(n, d)`` (standardise them first).
        y: Labels in {0, 1}, shape ``(n,)``.
        l2: The penalty, above 0.
        max_iter: Newton steps at most.
        tol: Stop when no coefficient moves more than this.

    Returns:
        ``(weights, bias)``.

    Raises:
        GateError: ``l2`` is not above 0.
    """
    if not l2 > 0:
        raise GateError(
            f"the gate's L2 penalty must be above 0 (got {l2}); separable data has no finite fit without it"
        )
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    penalty = np.full(d + 1, float(l2))
    penalty[-1] = 0.0
    beta = np.zeros(d + 1)
    objective = _objective(xb, y, beta, penalty)
    for _ in range(max_iter):
        p = sigmoid(xb @ beta)
        gradient = xb.T @ (p - y) + penalty * beta
        hessian = (xb * (p * (1.0 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-12 * np.eye(d + 1)
        step = np.linalg.solve(hessian, gradient)
        t = 1.0
        while True:
            candidate = beta - t * step
            new_objective = _objective(xb, y, candidate, penalty)
            if new_objective <= objective + 1e-12 or t < 1e-8:
                break
            t *= 0.5
        moved = float(np.max(np.abs(candidate - beta)))
        beta, objective = candidate, new_objective
        if moved < tol:
            break
    return beta[:-1], float(beta[-1])


@dataclass(frozen=True)
class GateModel:
    """A fitted relevance gate: ``sigmoid(bias + sum(weight * (x - mean) / scale)) >= threshold``.

    Attributes:
        feature_names: The features it reads, in order.
        mean: Each feature's calibration-set mean.
        scale: Each feature's calibration-set standard deviation (1 for a constant feature).
        weights: Logistic-regression weights on the standardised features.
        bias: The intercept.
        threshold: The probability at or above which a question counts as about the collection.
    """

    feature_names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float

    def __post_init__(self) -> None:
        d = len(self.feature_names)
        if not len(self.mean) == len(self.scale) == len(self.weights) == d:
            raise GateError(
                f"gate model has {d} features but {len(self.mean)} means, {len(self.scale)} scales and "
                f"{len(self.weights)} weights; recalibrate the gate"
            )

    def _vector(self, features: Mapping[str, float]) -> np.ndarray:
        missing = [name for name in self.feature_names if name not in features]
        if missing:
            raise GateError(f"gate features missing: {', '.join(missing)}; compute them with gate_features()")
        return np.asarray([float(features[name]) for name in self.feature_names], dtype=np.float64)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a feature matrix whose columns follow :attr:`feature_names`."""
        z = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights) + self.bias
        return sigmoid(np.asarray(z, dtype=np.float64))

    def probability(self, features: Mapping[str, float]) -> float:
        """The probability that the question is about the collection.

        Args:
            features: At least :attr:`feature_names` (from :func:`gate_features`).

        Returns:
            A probability in [0, 1].

        Raises:
            GateError: A feature is missing.
        """
        return float(self.probabilities(self._vector(features)[None, :])[0])

    def is_relevant(self, features: Mapping[str, float]) -> bool:
        """Whether :meth:`probability` reaches :attr:`threshold`."""
        return self.probability(features) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` reads back."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateModel:
        """Rebuild a model from :meth:`to_dict`'s output.

        Raises:
            GateError: A key is missing or a value is not a finite number.
        """
        try:
            model = cls(
                feature_names=tuple(str(n) for n in d["feature_names"]),
                mean=tuple(float(v) for v in d["mean"]),
                scale=tuple(float(v) for v in d["scale"]),
                weights=tuple(float(v) for v in d["weights"]),
                bias=float(d["bias"]),
                threshold=float(d["threshold"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GateError(f"not a gate model ({exc!r}); recalibrate the gate") from exc
        values = (*model.mean, *model.scale, *model.weights, model.bias, model.threshold)
        if not all(math.isfinite(v) for v in values):
            raise GateError("gate model holds a non-finite number; recalibrate the gate")
        return model
