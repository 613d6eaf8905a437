"""Calibrating the gate on labelled questions: precision-recall curves, threshold rules, cross-validation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import GateError
from ._model import GateModel, fit_logistic, standardize

__all__ = ["Calibration", "PRPoint", "calibrate_gate", "precision_recall_curve", "threshold_gate"]

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 5

# Fits a gate on training rows; returns the decision function for other rows and its threshold.
_Fit = Callable[[np.ndarray, np.ndarray], tuple[Callable[[np.ndarray], np.ndarray], float]]


@dataclass(frozen=True)
class PRPoint:
    """One operating point: questions scoring at or above ``threshold`` are let through.

    Attributes:
        threshold: The score cut.
        precision: Of the questions let through, the share that were related (1.0 when none pass).
        recall: Of the related questions, the share let through.
        f1: The harmonic mean of precision and recall.
    """

    threshold: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, float]:
        """The four numbers by name."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PRPoint:
        """Rebuild a point from :meth:`to_dict`'s output."""
        return cls(float(d["threshold"]), float(d["precision"]), float(d["recall"]), float(d["f1"]))


def _point(threshold: float, tp: int, fp: int, positives: int) -> PRPoint:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PRPoint(float(threshold), precision, recall, f1)


def precision_recall_curve(scores: Sequence[float], labels: Sequence[bool]) -> list[PRPoint]:
    """Precision and recall at every distinct score used as the threshold (``score >= threshold`` passes).

    Args:
        scores: One score a question, higher = more likely related.
        labels: True for a related question, aligned with ``scores``.

    Returns:
        One point per distinct score, thresholds ascending (recall falls along the list).

    Raises:
        GateError: Mismatched lengths.
    """
    if len(scores) != len(labels):
        raise GateError(f"{len(scores)} scores for {len(labels)} labels; pass one label a score")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    positives = int(y.sum())
    points = [
        _point(s[i], int(tp[i]), int(fp[i]), positives)
        for i in range(len(s))
        if i == len(s) - 1 or s[i + 1] != s[i]  # the last row of each group of equal scores
    ]
    return points[::-1]


def _choose(curve: Sequence[PRPoint], min_precision: float | None, *, strict: bool) -> PRPoint:
    if min_precision is None:
        # Best F1; among equals, the stricter (higher) threshold.
        return max(reversed(curve), key=lambda p: p.f1)
    meeting = [p for p in curve if p.precision >= min_precision]
    if meeting:
        return meeting[0]  # the lowest threshold that still meets it: the highest recall
    best = max(reversed(curve), key=lambda p: (p.precision, p.recall))
    if strict:
        raise GateError(
            f"no threshold reaches precision {min_precision:.3f} on the calibration set (best "
            f"{best.precision:.3f} at recall {best.recall:.3f}); lower min_precision or add better-separated "
            "questions"
        )
    return best


def _margin_threshold(scores: np.ndarray, chosen: float) -> float:
    # Halfway to the next lower calibration score: the calibration set is classified exactly as at the
    # chosen point, and new questions just below the lowest accepted one are not cut by a hair.
    lower = scores[scores < chosen]
    return float((chosen + lower.max()) / 2) if len(lower) else float(chosen)


def _fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    # Stratified: each class is shuffled and dealt round-robin, so every fold holds both classes.
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for value in (False, True):
        members = np.flatnonzero(labels == value)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def _cross_validate(
    x: np.ndarray, y: np.ndarray, fit: _Fit, folds: int, seed: int
) -> tuple[np.ndarray, float]:
    # Each row is decided by a gate fit on the other folds only; returns the decisions and mean threshold.
    fold = _fold_assignment(y, folds, seed)
    decisions = np.zeros(len(y), dtype=bool)
    thresholds = []
    for f in range(folds):
        held_out = fold == f
        decide, threshold = fit(x[~held_out], y[~held_out])
        decisions[held_out] = decide(x[held_out])
        thresholds.append(threshold)
    return decisions, float(np.mean(thresholds))


@dataclass(frozen=True)
class Calibration:
    """A calibrated gate with the evidence for it.

    Attributes:
        model: The gate, fit on all labelled questions.
        curve: Its precision-recall curve on them (thresholds ascending, on the probability scale).
        chosen: The operating point the rule picked (``model.threshold`` sits halfway between its
            threshold and the next lower calibration score, which classifies the set the same way).
        n_related: Related (positive) questions used.
        n_unrelated: Unrelated questions used.
        cross_validated: Precision, recall and F1 of the same rule under k-fold cross-validation: each
            question decided by a gate fit and thresholded without it (threshold: the folds' mean).
    """

    model: GateModel
    curve: tuple[PRPoint, ...]
    chosen: PRPoint
    n_related: int
    n_unrelated: int
    cross_validated: PRPoint

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` reads back."""
        return {
            "model": self.model.to_dict(),
            "curve": [p.to_dict() for p in self.curve],
            "chosen": self.chosen.to_dict(),
            "n_related": self.n_related,
            "n_unrelated": self.n_unrelated,
            "cross_validated": self.cross_validated.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict`'s output.

        Raises:
            GateError: The dict is not a calibration.
        """
        try:
            return cls(
                model=GateModel.from_dict(d["model"]),
                curve=tuple(PRPoint.from_dict(p) for p in d["curve"]),
                chosen=PRPoint.from_dict(d["chosen"]),
                n_related=int(d["n_related"]),
                n_unrelated=int(d["n_unrelated"]),
                cross_validated=PRPoint.from_dict(d["cross_validated"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GateError(f"not a gate calibration ({exc!r}); recalibrate the gate") from exc

    def table(self, points: int = 11) -> str:
        """The precision-recall curve as a text table of about ``points`` rows, the chosen point marked ``*``.

        Args:
            points: Rows to show (spread evenly over the curve); the chosen point is always shown.

        Returns:
            The table, then the cross-validated figures, as lines of text.
        """
        n = len(self.curve)
        rows = {round(i) for i in np.linspace(0, n - 1, num=min(max(points, 2), n))} if n else set()
        rows |= {i for i, p in enumerate(self.curve) if p == self.chosen}
        lines = [f"  {'threshold':>9}  {'precision':>9}  {'recall':>6}  {'f1':>6}"]
        for i in sorted(rows):
            p = self.curve[i]
            mark = "*" if p == self.chosen else " "
            lines.append(f"{mark} {p.threshold:9.4f}  {p.precision:9.3f}  {p.recall:6.3f}  {p.f1:6.3f}")
        cv = self.cross_validated
        lines.append(
            f"{self.n_related} related, {self.n_unrelated} unrelated; cross-validated: "
            f"precision {cv.precision:.3f}, recall {cv.recall:.3f}, f1 {cv.f1:.3f}"
        )
        return "\n".join(lines)


def _matrix(
    related: Sequence[Mapping[str, float]], unrelated: Sequence[Mapping[str, float]], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    if len(related) < MIN_PER_CLASS or len(unrelated) < MIN_PER_CLASS:
        raise GateError(
            f"calibrating the gate needs at least {MIN_PER_CLASS} related and {MIN_PER_CLASS} unrelated "
            f"questions, got {len(related)} and {len(unrelated)}; label more questions"
        )
    rows = [*related, *unrelated]
    missing = sorted({n for row in rows for n in names if n not in row})
    if missing:
        raise GateError(
            f"labelled questions lack features {', '.join(missing)}; compute them with gate_features()"
        )
    x = np.asarray([[float(row[n]) for n in names] for row in rows], dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise GateError("a gate feature is not finite; compute features with gate_features()")
    y = np.concatenate([np.ones(len(related), dtype=bool), np.zeros(len(unrelated), dtype=bool)])
    return x, y


def _calibrate(
    x: np.ndarray,
    y: np.ndarray,
    make_model: Callable[[np.ndarray, np.ndarray], GateModel],
    min_precision: float | None,
    folds: int,
    seed: int,
) -> Calibration:
    def fit(
        x_fit: np.ndarray, y_fit: np.ndarray, strict: bool = False
    ) -> tuple[GateModel, list[PRPoint], PRPoint]:
        unthresholded = make_model(x_fit, y_fit)
        p = unthresholded.probabilities(x_fit)
        curve = precision_recall_curve(p.tolist(), y_fit.tolist())
        chosen = _choose(curve, min_precision, strict=strict)
        model = GateModel(**{**unthresholded.__dict__, "threshold": _margin_threshold(p, chosen.threshold)})
        return model, curve, chosen

    def fold_fit(x_fit: np.ndarray, y_fit: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
        model = fit(x_fit, y_fit)[0]
        return (lambda rows: model.probabilities(rows) >= model.threshold), model.threshold

    model, curve, chosen = fit(x, y, strict=True)
    n_folds = min(folds, int(y.sum()), int((~y).sum()))
    if n_folds < 2:
        raise GateError(f"cross-validation needs at least 2 folds, got {folds}")
    decisions, mean_threshold = _cross_validate(x, y, fold_fit, n_folds, seed)
    tp = int(np.sum(decisions & y))
    fp = int(np.sum(decisions & ~y))
    cv = _point(mean_threshold, tp, fp, int(y.sum()))
    logger.info(
        "gate calibrated on %d+%d questions: f1 %.3f (cross-validated %.3f)",
        y.sum(),
        (~y).sum(),
        chosen.f1,
        cv.f1,
    )
    return Calibration(model, tuple(curve), chosen, int(y.sum()), int((~y).sum()), cv)


def _check_rule(target: str, min_precision: float | None) -> None:
    if target not in ("f1", "precision"):
        raise GateError(f"unknown gate target {target!r}; use 'f1' or 'precision' (with min_precision)")
    if target == "precision" and min_precision is None:
        raise GateError("target 'precision' needs min_precision, e.g. 0.95")
    if min_precision is not None and not 0.0 < min_precision <= 1.0:
        raise GateError(f"min_precision must be in (0, 1], got {min_precision}")


def calibrate_gate(
    related: Sequence[Mapping[str, float]],
    unrelated: Sequence[Mapping[str, float]],
    *,
    target: str = "f1",
    min_precision: float | None = None,
    l2: float = 1.0,
    folds: int = 5,
    seed: int = 0,
    features: Sequence[str] | None = None,
) -> Calibration:
    """Fit the gate's logistic regression on labelled questions and pick its threshold.

    "Relevant" (related to the collection) is the positive class: precision is the share of the questions
    let through that were related, recall the share of related questions let through.

    Args:
        related: Features (:func:`gate_features`) of questions the collection answers.
        unrelated: Features of questions it does not.
        target: ``"f1"``: the threshold with the best F1 on these questions; ``"precision"``: see
            ``min_precision``.
        min_precision: When given, the lowest threshold whose precision reaches it (the most recall at
            that precision), whatever ``target`` says.
        l2: The L2 penalty on the standardised weights (above 0).
        folds: Cross-validation folds (at most the size of the smaller class).
        seed: Seeds the fold assignment.
        features: The features to use (default: the keys of the first related question, in order).

    Returns:
        The calibration.

    Raises:
        GateError: Fewer than 5 questions of either class, missing features, a bad rule, or a
            ``min_precision`` no threshold reaches.
    """
    _check_rule(target, min_precision)
    names = tuple(features) if features is not None else tuple(related[0]) if related else ()
    x, y = _matrix(related, unrelated, names)

    def make_model(x_fit: np.ndarray, y_fit: np.ndarray) -> GateModel:
        mean, scale = standardize(x_fit)
        weights, bias = fit_logistic((x_fit - mean) / scale, y_fit.astype(np.float64), l2=l2)
        return GateModel(
            names, tuple(mean.tolist()), tuple(scale.tolist()), tuple(weights.tolist()), bias, 0.5
        )

    return _calibrate(x, y, make_model, min_precision, folds, seed)


def threshold_gate(
    feature: str,
    related: Sequence[Mapping[str, float]],
    unrelated: Sequence[Mapping[str, float]],
    *,
    target: str = "f1",
    min_precision: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> Calibration:
    """The one-feature baseline: a threshold on one feature (HuixiangDou's way, on ``dense_top1``).

    Same rules, cross-validation and result shape as :func:`calibrate_gate`; the model standardises
    the feature and has weight 1 and bias 0, so its probability rises with the feature.

    Args:
        feature: The feature to threshold, e.g. ``"dense_top1"``.
        related: Features of related questions.
        unrelated: Features of unrelated questions.
        target: As in :func:`calibrate_gate`.
        min_precision: As in :func:`calibrate_gate`.
        folds: As in :func:`calibrate_gate`.
        seed: As in :func:`calibrate_gate`.

    Returns:
        The calibration.

    Raises:
        GateError: As :func:`calibrate_gate`.
    """
    _check_rule(target, min_precision)
    x, y = _matrix(related, unrelated, (feature,))

    def make_model(x_fit: np.ndarray, y_fit: np.ndarray) -> GateModel:
        mean, scale = standardize(x_fit)
        return GateModel((feature,), (float(mean[0]),), (float(scale[0]),), (1.0,), 0.0, 0.5)

    return _calibrate(x, y, make_model, min_precision, folds, seed)
