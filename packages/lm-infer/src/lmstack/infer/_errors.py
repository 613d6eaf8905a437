"""Errors raised by lmstack-infer; all derive from :class:`lmstack.core.LMStackError`."""

from __future__ import annotations

from lmstack.core import LMStackError

__all__ = ["InferError", "InvalidRequestError"]


class InferError(LMStackError):
    """Base class of lmstack-infer's errors."""


class InvalidRequestError(InferError, ValueError):
    """One request is invalid (bad sampling parameters, empty or too long prompt, unknown stop ids).

    Only that request fails; the engine keeps serving the others.
    """
