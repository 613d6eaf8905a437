"""The errors lmstack-train raises on purpose.

Everything derives from :class:`lmstack.core.LMStackError`, so one ``except`` clause catches the whole
stack; :class:`TrainError` catches this layer alone. They live in ``data/`` because the data pipeline
is the bottom of the layer (the loop and the recipes import it, never the reverse); ``lmstack.train``
exports them.
"""

from __future__ import annotations

import logging

from lmstack.core import ConfigError, LMStackError

__all__ = ["DataError", "SkipPolicy", "TrainConfigError", "TrainError", "format_location"]

logger = logging.getLogger(__name__)


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


_WARN_LIMIT = 5  # skipped records logged one by one; the rest are counted only


class SkipPolicy:
    """What to do with a bad record: ``fail`` (raise, saying how to skip) or ``skip`` (warn, count).

    The one policy of every ``data.on_*`` option: readers apply it to malformed lines, the formats to
    malformed or empty records, tokenization to records the chat template refuses.

    Args:
        policy: ``fail`` or ``skip``.
        option: The config key that sets it (``data.on_malformed``), named in the error.

    Attributes:
        count: Records skipped so far.
    """

    def __init__(self, policy: str, option: str) -> None:
        self.policy = policy
        self.option = option
        self.count = 0

    def __call__(self, exc: DataError) -> None:
        """Applies the policy to one bad record: re-raise, or count (and warn about the first few).

        Raises:
            DataError: Of ``exc``'s own class, when the policy is ``fail``.
        """
        if self.policy == "fail":
            raise type(exc)(
                f"{exc.detail} (set {self.option}=skip to skip and count such records)",
                source=exc.source,
                line=exc.line,
            ) from None
        self.count += 1
        if self.count <= _WARN_LIMIT:
            logger.warning("skipping %s: %s", format_location(exc.source, exc.line), exc.detail)
        elif self.count == _WARN_LIMIT + 1:
            logger.warning("more records skipped under %s=skip (counted, not logged)", self.option)
