"""Dataset formats: Alpaca, ShareGPT, OpenAI messages and plain text, all turned into one :class:`Sample`.

A sample is either a conversation (``messages``: OpenAI-style ``{"role", "content"}`` dicts, roles
``system``, ``user``, ``assistant`` and ``tool``; an assistant's ``tool_calls`` and a tool turn's
``tool_call_id``/``name`` are kept for the chat template) or a plain ``text`` document.

* **Alpaca**: ``instruction``, optional ``input`` (appended to the instruction after a newline),
  ``output``; optional ``system`` and ``history`` (a list of ``[query, reply]`` pairs before it).
* **ShareGPT**: ``conversations`` (or ``data.messages_field``), a list of ``{"from", "value"}`` turns.
  ``from`` maps to roles: ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant,
  ``system`` -> system, ``tool``/``observation`` -> tool, ``function_call`` -> assistant (its value,
  the call as JSON text, is the assistant's content). Optional top-level ``system`` and ``tools``
  (a list, or a JSON string of one).
* **OpenAI messages**: ``messages`` (or ``data.messages_field``), a list of ``{"role", "content"}``
  turns (content a string or a list of content parts; None on an assistant turn that has
  ``tool_calls``); optional top-level ``tools``.
* **Text**: ``data.text_field`` (``text``) of a record, or a document of a ``.txt`` file.

``auto`` picks the format of each file from its first record. Conversations must end with an
assistant turn (supervised finetuning trains on the replies).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import DataError, SkipPolicy
from lmstack.train.data._readers import RawRecord, read_records
from lmstack.train.data._stats import DataStats

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_ROLES",
    "SHAREGPT_ROLES",
    "FormatName",
    "Sample",
    "content_text",
    "detect_format",
    "iter_samples",
    "to_sample",
]

FormatName = Literal["alpaca", "sharegpt", "messages", "text"]

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""The roles a conversation may hold."""

SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
"""ShareGPT ``from`` values and the role each becomes."""

_DEFAULT_MESSAGES_FIELD = {"messages": "messages", "sharegpt": "conversations"}


@dataclass
class Sample:
    """One training example: a conversation or a text document.

    Attributes:
        messages: The conversation (``{"role", "content", ...}`` dicts), or None for a document.
        text: The document, or None for a conversation.
        tools: JSON schemas of the tools offered in the conversation, passed to the chat template.
        source: The file it came from.
        line: Where in that file (see :class:`~lmstack.train.data._readers.RawRecord`).
    """

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    source: str = ""
    line: int = 0

    @property
    def is_chat(self) -> bool:
        """Whether this is a conversation (else a text document)."""
        return self.messages is not None


class EmptyTurnError(DataError):
    """A conversation has an empty assistant turn (or a document is empty)."""


class _EmptyText(EmptyTurnError):
    """A text document is empty or whitespace only (always skipped and counted)."""


def _keys(record: Mapping[str, Any]) -> str:
    names = sorted(str(k) for k in record)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def detect_format(record: Any, *, text_field: str = "text", messages_field: str | None = None) -> FormatName:
    """Tells the format of a record by its keys.

    Args:
        record: A record as read (a dict, or a str from a text file).
        text_field: The key of a text document.
        messages_field: A custom key holding the conversation, if any.

    Returns:
        ``text`` for a str or a record with ``text_field``; ``messages`` or ``sharegpt`` for a
        conversation (by whether its turns have ``role`` or ``from``); ``alpaca`` for a record with
        ``instruction`` and ``output``.

    Raises:
        DataError: The record fits none of the formats.
    """
    if isinstance(record, str):
        return "text"
    if not isinstance(record, Mapping):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    for key in (messages_field, "messages", "conversations"):
        if key and isinstance(record.get(key), list):
            turns = record[key]
            first = turns[0] if turns else None
            if isinstance(first, Mapping) and "from" in first:
                return "sharegpt"
            if isinstance(first, Mapping) and "role" in first:
                return "messages"
            return "sharegpt" if key == "conversations" else "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    raise DataError(
        f"cannot tell the data format from the record's keys ({_keys(record)}): expected 'messages' "
        f"(OpenAI chat), 'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), or "
        f"{text_field!r} (text). Set data.format, data.messages_field or data.text_field."
    )


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the joined ``text`` of its content parts.

    Parts without string text (images, audio, a ``text`` of None) contribute nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def _check_conversation(messages: list[dict[str, Any]], where: tuple[str, int]) -> list[dict[str, Any]]:
    source, line = where
    if not messages:
        raise DataError("the conversation is empty", source=source, line=line)
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DataError(
                f"unknown role {role!r} in message {index}; allowed roles: {', '.join(CHAT_ROLES)}",
                source=source,
                line=line,
            )
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise DataError(f"message {index} ({role}) has no 'content'", source=source, line=line)
        if not isinstance(content, (str, list)):
            raise DataError(
                f"message {index} ({role}): 'content' must be a string or a list of content parts, "
                f"got {type(content).__name__}",
                source=source,
                line=line,
            )
    last = messages[-1]["role"]
    if last != "assistant":
        raise DataError(
            f"the conversation ends with a {last!r} turn, not an assistant turn: finetuning trains on "
            "the assistant's replies (drop the trailing turns or the record)",
            source=source,
            line=line,
        )
    for index, message in enumerate(messages):
        if (
            message["role"] == "assistant"
            and not content_text(message.get("content")).strip()
            and not message.get("tool_calls")
        ):
            raise EmptyTurnError(f"assistant turn (message {index}) is empty", source=source, line=line)
    return messages


def _str_field(record: Mapping[str, Any], key: str, where: tuple[str, int], what: str) -> str:
    value = record.get(key)
    if key not in record or value is None:
        raise DataError(
            f"missing field {key!r} ({what}; the record has: {_keys(record)})", source=where[0], line=where[1]
        )
    if not isinstance(value, str):
        raise DataError(
            f"field {key!r} must be a string, got {type(value).__name__}", source=where[0], line=where[1]
        )
    return value


def _optional_str(record: Mapping[str, Any], key: str, where: tuple[str, int]) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"field {key!r} must be a string, got {type(value).__name__}", source=where[0], line=where[1]
        )
    return value


def _tools(record: Mapping[str, Any], where: tuple[str, int]) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"field 'tools' is not valid JSON: {exc.msg}", source=where[0], line=where[1]
            ) from exc
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise DataError("field 'tools' must be a list of JSON schemas", source=where[0], line=where[1])
    return [dict(t) for t in tools]


def _alpaca(record: Mapping[str, Any], where: tuple[str, int]) -> list[dict[str, Any]]:
    need = "an Alpaca record needs 'instruction' and 'output'"
    instruction = _str_field(record, "instruction", where, need)
    output = _str_field(record, "output", where, need)
    extra = _optional_str(record, "input", where)
    system = _optional_str(record, "system", where)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(
            "field 'history' must be a list of [query, reply] pairs", source=where[0], line=where[1]
        )
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(
                f"history[{index}] must be a [query, reply] pair of strings", source=where[0], line=where[1]
            )
        messages.append({"role": "user", "content": pair[0]})
        messages.append({"role": "assistant", "content": pair[1]})
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages


def _turns(record: Mapping[str, Any], fmt: str, field: str | None, where: tuple[str, int]) -> list[Any]:
    keys = [field] if field else [_DEFAULT_MESSAGES_FIELD[fmt], *_DEFAULT_MESSAGES_FIELD.values()]
    for key in keys:
        if key in record:
            turns = record[key]
            if not isinstance(turns, list):
                raise DataError(
                    f"field {key!r} must be a list of turns, got {type(turns).__name__}",
                    source=where[0],
                    line=where[1],
                )
            return turns
    raise DataError(
        f"missing field {keys[0]!r} (the conversation; the record has: {_keys(record)}). Set "
        "data.messages_field if the conversation is under another key.",
        source=where[0],
        line=where[1],
    )


def _sharegpt(record: Mapping[str, Any], field: str | None, where: tuple[str, int]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = _optional_str(record, "system", where)
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(_turns(record, "sharegpt", field, where)):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"turn {index} must be an object with 'from' and 'value'", source=where[0], line=where[1]
            )
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"unknown role {speaker!r} in turn {index}; allowed ShareGPT roles: "
                f"{', '.join(SHAREGPT_ROLES)}",
                source=where[0],
                line=where[1],
            )
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise DataError(
                f"turn {index} ({speaker}) needs a string 'value', got {type(value).__name__}",
                source=where[0],
                line=where[1],
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _openai(record: Mapping[str, Any], field: str | None, where: tuple[str, int]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(_turns(record, "messages", field, where)):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"message {index} must be an object with 'role' and 'content'", source=where[0], line=where[1]
            )
        messages.append(dict(turn))
    return messages


def to_sample(
    raw: RawRecord, fmt: FormatName, *, text_field: str = "text", messages_field: str | None = None
) -> Sample:
    """Converts one record of a known format to a :class:`Sample`.

    Args:
        raw: The record and where it came from.
        fmt: Its format.
        text_field: The key of a text document.
        messages_field: The key of the conversation (None: ``messages`` or ``conversations``).

    Returns:
        The sample.

    Raises:
        EmptyTurnError: An assistant turn is empty, or a text document is.
        DataError: A missing or mistyped field, an unknown role, a conversation that does not end
            with an assistant turn (the message names the file and line).
    """
    where = (raw.source, raw.line)
    record = raw.record
    if fmt == "text":
        if isinstance(record, str):
            text = record
        elif isinstance(record, Mapping):
            text = _str_field(record, text_field, where, "the document; set data.text_field")
        else:
            raise DataError(
                f"a record must be a JSON object, got {type(record).__name__}", source=where[0], line=where[1]
            )
        if not text.strip():
            raise _EmptyText("the document is empty", source=where[0], line=where[1])
        return Sample(text=text, source=raw.source, line=raw.line)
    if not isinstance(record, Mapping):
        raise DataError(
            f"a {fmt} record must be a JSON object, got {type(record).__name__}",
            source=where[0],
            line=where[1],
        )
    if fmt == "alpaca":
        messages = _alpaca(record, where)
        tools = None
    elif fmt == "sharegpt":
        messages = _sharegpt(record, messages_field, where)
        tools = _tools(record, where)
    elif fmt == "messages":
        messages = _openai(record, messages_field, where)
        tools = _tools(record, where)
    else:
        raise DataError(f"unknown data format {fmt!r}; expected alpaca, sharegpt, messages or text")
    return Sample(
        messages=_check_conversation(messages, where), tools=tools, source=raw.source, line=raw.line
    )


def iter_samples(
    files: Sequence[str | Path], config: DataConfig, stats: DataStats | None = None
) -> Iterator[Sample]:
    """Streams the samples of data files, applying the config's format and error policies.

    Args:
        files: The data files (see :func:`~lmstack.train.data.resolve_data_files`).
        config: ``format``, ``text_field``, ``messages_field``, ``txt_mode``, ``on_malformed`` and
            ``on_empty_assistant`` are used.
        stats: Counters to update (``files``, ``records``, ``skipped_*``, ``formats``).

    Yields:
        The samples, file by file, in file order.

    Raises:
        DataError: A malformed record with ``on_malformed="fail"``, an empty assistant turn with
            ``on_empty_assistant="fail"``, or a file whose format cannot be told.
    """
    stats = stats if stats is not None else DataStats()
    for file in files:
        path = Path(file)
        is_txt = path.name.lower().endswith((".txt", ".txt.gz"))
        if is_txt and config.format not in ("auto", "text"):
            raise DataError(
                f"{path}: a .txt file holds plain text, but data.format is {config.format!r}; "
                "use data.format=auto or text"
            )
        if config.format in ("preference", "kto", "trl", "ultrafeedback"):
            raise DataError(
                f"data.format {config.format!r} is preference data; read it with the preference recipes "
                "(lmstack train dpo|orpo|simpo|kto|rm)"
            )
        fmt: FormatName | None = None if config.format == "auto" else cast(FormatName, config.format)
        # Per file, as the readers' malformed-line policy: the first few of each file are logged.
        skip_empty = SkipPolicy(config.on_empty_assistant, "data.on_empty_assistant")
        skip_malformed = SkipPolicy(config.on_malformed, "data.on_malformed")
        for raw in read_records(
            path, txt_mode=config.txt_mode, on_malformed=config.on_malformed, stats=stats
        ):
            if fmt is None:
                try:
                    fmt = detect_format(
                        raw.record, text_field=config.text_field, messages_field=config.messages_field
                    )
                except DataError as exc:
                    raise DataError(exc.detail, source=raw.source, line=raw.line) from None
                logger.info("%s: %s format", path, fmt)
            try:
                sample = to_sample(
                    raw, fmt, text_field=config.text_field, messages_field=config.messages_field
                )
            except _EmptyText:
                stats.skipped_empty += 1
                continue
            except EmptyTurnError as exc:
                skip_empty(exc)
                stats.skipped_empty += 1
                continue
            except DataError as exc:
                skip_malformed(exc)
                stats.skipped_malformed += 1
                continue
            stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            yield sample
