"""The errors lmstack-train raises on purpose.

Everything derives from :class:`lmstack.core.LMStackError`, so one ``except`` clause catches the whole
stack; :class:`TrainError` catches this layer alone.
"""

from __future__ import annotations

from lmstack.core import ConfigError, LMStackError

__all__ = ["DataError", "TrainConfigError", "TrainError"]


class TrainError(LMStackError):
    """Base class of every error raised on purpose by lmstack-train."""


class DataError(TrainError, ValueError):
    """Training data could not be read or used: a malformed record, an unknown role, an empty turn.

    The message starts with where the problem is (``path:line`` for text files, ``path, row N`` for
    Parquet) when one record is to blame.

    Attributes:
        detail: The message without the location.
        source: The file the bad record came from, if any.
        line: Its 1-based line number (JSON Lines, text, a JSON array's element) or its 0-based row
            (Parquet), if known.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        super().__init__(f"{format_location(source, line)}: {message}" if source else message)
        self.detail = message
        self.source = source
        self.line = line


class TrainConfigError(TrainError, ConfigError):
    """A training configuration is invalid: an unknown key, a value of the wrong type, a bad choice.

    Also a :class:`lmstack.core.ConfigError` (and so a ``ValueError``).

    Attributes:
        field: The dotted configuration key at fault (``optim.lr``), when one is to blame.
    """


def format_location(source: str | None, line: int | None) -> str:
    """Formats where a record lives: ``data.jsonl:12`` or ``data.parquet, row 7``.

    Args:
        source: The file.
        line: The line (or Parquet row), or None.

    Returns:
        The location, for messages.
    """
    if source is None:
        return "<unknown>"
    if line is None:
        return source
    if source.endswith(".parquet"):
        return f"{source}, row {line}"
    return f"{source}:{line}"
