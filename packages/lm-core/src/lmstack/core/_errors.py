"""The error hierarchy every lmstack layer builds on.

Each layer subclasses :class:`LMStackError` so that a user can catch everything
lmstack raises with one ``except`` clause, or one layer's errors alone.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "LMStackError", "TokenizerError"]


class LMStackError(Exception):
    """Base class of every error raised on purpose by lmstack.

    Messages say what was wrong and what to do about it.
    """


class ConfigError(LMStackError, ValueError):
    """A model configuration is invalid or unsupported.

    Attributes:
        field: The configuration key at fault, when one is to blame.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CheckpointError(LMStackError):
    """A checkpoint could not be read or written (missing shard, shape mismatch, corrupt file)."""


class TokenizerError(LMStackError):
    """A tokenizer could not be loaded, trained, saved or applied."""
