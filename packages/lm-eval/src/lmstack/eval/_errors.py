"""Errors raised by lmstack-eval; all derive from :class:`lmstack.core.LMStackError`.

Each message names what was at fault (the key and the file, the dataset file and line, the template
field and the document) so that a user can fix the input without reading lmstack's source.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.core import LMStackError

__all__ = [
    "DatasetError",
    "EvalError",
    "MetricError",
    "TaskConfigError",
    "TemplateError",
    "UnknownTaskError",
]


class EvalError(LMStackError):
    """Base class of lmstack-eval's errors."""


class TaskConfigError(EvalError, ValueError):
    """A task definition is invalid: an unknown or unsupported key, a bad value, a missing field.

    Attributes:
        key: The configuration key at fault (dotted for nested keys, e.g. ``dataset_kwargs.split``),
            when one is to blame.
        source: The task file the key came from, when the task was read from a file.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | Path | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = None if source is None else Path(source)


class DatasetError(EvalError, ValueError):
    """A dataset could not be read: a missing file, a malformed row, an unsupported format.

    Attributes:
        path: The data file at fault, when one is to blame.
        line: The 1-based line of the malformed row in ``path`` (the row number for parquet), when known.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line


class TemplateError(EvalError, ValueError):
    """A prompt template could not be rendered for one document (typically a field the doc lacks).

    Attributes:
        field: The name the template used that the document does not have, when that is the cause.
        template: The template's source text.
        doc_id: The document's index in its split.
    """

    def __init__(self, message: str, *, field: str | None, template: str, doc_id: int | None) -> None:
        super().__init__(message)
        self.field = field
        self.template = template
        self.doc_id = doc_id


class UnknownTaskError(EvalError, KeyError):
    """A task was asked for by a name that no built-in task or task file has."""

    def __str__(self) -> str:
        # KeyError would quote the message; show it as written.
        return str(self.args[0]) if self.args else ""


class MetricError(EvalError, ValueError):
    """A metric is unknown, misconfigured, or cannot score the outputs it was given."""
