"""The relevance gate: is a question about the collection? Decided from a search's own scores, no LLM.

:func:`gate_features` turns what a search returned into numbers, :func:`calibrate_gate` fits a logistic
regression on labelled questions and picks its threshold, and :class:`GateModel` decides.
:func:`threshold_gate` is the one-feature baseline to report beside it.
"""

from __future__ import annotations

from ._calibrate import Calibration, PRPoint, calibrate_gate, precision_recall_curve, threshold_gate
from ._features import FEATURE_NAMES, gate_features
from ._model import GateModel

__all__ = [
    "FEATURE_NAMES",
    "Calibration",
    "GateModel",
    "PRPoint",
    "calibrate_gate",
    "gate_features",
    "precision_recall_curve",
    "threshold_gate",
]
