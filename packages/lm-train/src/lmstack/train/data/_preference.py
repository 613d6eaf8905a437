"""Preference data: paired (chosen, rejected) and unpaired (KTO) completions, read and tokenized.

Every record becomes a :class:`PreferenceSample`: the prompt (OpenAI-style messages) and its
completions (assistant messages): ``[chosen, rejected]`` for a pair, ``[completion]`` with a bool
``label`` for KTO. The formats, decided per file from its first record as ``data.format=auto`` does:

* **trl**: ``prompt``, ``chosen``, ``rejected``. The prompt is text (one user turn) or a message
  list; ``chosen``/``rejected`` are text, an assistant message, or a message list ending with the
  assistant turn (any turns before it continue the prompt, and must be the same in both). Without a
  ``prompt`` (TRL's "implicit prompt"), ``chosen`` and ``rejected`` are whole conversations whose
  turns before the last are the prompt.
* **messages**: OpenAI messages with two assistant endings: ``messages`` (or ``data.messages_field``:
  the prompt turns) plus ``chosen`` and ``rejected``, each an assistant message or text.
* **ultrafeedback**: ``prompt`` (or ``instruction``) and ``completions``, a list of
  ``{"response" | "text", "overall_score" | "score" | "rating"}``: the best scored becomes chosen, the
  worst rejected (the first of equals). Completions without a numeric score are ignored; a record
  whose scores are all equal is a tie: skipped and counted (:attr:`PreferenceStats.ties`).
* **kto**: ``prompt``, ``completion`` and a bool ``label`` (desirable or not). With the ``kto`` mode,
  paired records are unpaired as TRL does: chosen with ``label=True``, rejected with ``label=False``.

The mode (``format`` argument, else ``data.format``): ``auto`` or ``preference`` read pairs (in any
of the first three formats), ``kto`` reads unpaired samples, and ``trl``, ``messages`` or
``ultrafeedback`` force one paired format. Malformed records (missing fields, a prompt ending with an
assistant turn, chosen identical to rejected, ...) are named by file and line and follow
``data.on_malformed``; an empty completion follows ``data.on_empty_assistant``.

**Tokenizing** (:class:`PreferenceTokenizer`): the prompt is rendered with the model's chat template
and the generation prompt (``P``), each completion as the assistant turn after it (``F``, trailing
whitespace after the end-of-turn token dropped). ``P`` must be a prefix of ``F`` (else
:class:`~lmstack.train.data.ChatTemplateError`: the template renders the last assistant turn
differently, as some reasoning templates do), and the tokens of ``P`` a prefix of the tokens of ``F``
(else the record is malformed: the tokenizer merges across the boundary). The completion's tokens are
``tokens(F)[len(tokens(P)):]`` (the reply and its end-of-turn token), and they alone carry the loss:
not the prompt, nor any earlier assistant turn in it. So chosen and rejected share their prompt
tokens exactly.

**Cache** (:func:`tokenize_preferences`): the tokenization cache of SFT
(:mod:`lmstack.train.data._cache`), with one extra file: each pair is stored as two consecutive
sequences (prompt+chosen, prompt+rejected; KTO: one), with their loss masks, and ``preference.bin``
holds each sequence's prompt length and role. The key adds the preference mode to the SFT key (data
files, tokenizer, templates, format fields and error policies); ``max_length`` is applied when packing
(see :mod:`lmstack.train.data._preference_packing`), so it does not invalidate the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from lmstack.core import LMStackError, Tokenizer, atomic_directory
from lmstack.train.data._cache import (
    CACHE_VERSION,
    TokenizedDataset,
    _batches,
    _remove_on_collect,
    _sizes_ok,
    _Writer,
    cache_key,
)
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import DataError, SkipPolicy
from lmstack.train.data._formats import CHAT_ROLES, EmptyTurnError, _tools, content_text
from lmstack.train.data._readers import RawRecord, read_records, resolve_data_files
from lmstack.train.data._stats import DataStats
from lmstack.train.data._tokenize import ChatTemplateError, SampleTokenizer, TokenizedSample

logger = logging.getLogger(__name__)

__all__ = [
    "PREFERENCE_MODES",
    "PreferenceFormatName",
    "PreferenceSample",
    "PreferenceStats",
    "PreferenceTokenizer",
    "TokenizedPreference",
    "TokenizedPreferences",
    "detect_preference_format",
    "iter_preference_samples",
    "preference_cache_key",
    "to_preference_samples",
    "tokenize_preferences",
]

PreferenceFormatName = Literal["trl", "messages", "ultrafeedback", "kto"]

PREFERENCE_MODES: tuple[str, ...] = ("auto", "preference", "kto", "trl", "messages", "ultrafeedback")
"""Values of the ``format`` of preference data (see the module docs)."""

PREFERENCE_CACHE_VERSION = 1
"""Bumped whenever the preference cache layout or its tokenization rules change."""

ROLE_CHOSEN, ROLE_REJECTED, ROLE_UNDESIRABLE, ROLE_DESIRABLE = 0, 1, 2, 3
"""The role of a stored sequence (``preference.bin``)."""

_SCORE_KEYS = ("overall_score", "score", "rating")
_TEXT_KEYS = ("response", "text")
_BATCH = 512


# ------------------------------------------------------------------------------------------------
# samples and stats
# ------------------------------------------------------------------------------------------------


@dataclass
class PreferenceStats(DataStats):
    """:class:`DataStats` of preference data; ``samples`` counts pairs (KTO: completions).

    Attributes:
        ties: UltraFeedback-style records skipped because all their scores were equal.
        desirable: KTO samples labelled desirable.
        undesirable: KTO samples labelled undesirable.
    """

    ties: int = 0
    desirable: int = 0
    undesirable: int = 0

    def summary(self) -> str:
        """A one-line report (the :class:`DataStats` one, plus ties and KTO labels)."""
        parts = [super().summary()]
        if self.ties:
            parts.append(f"{self.ties} tied records skipped")
        if self.desirable or self.undesirable:
            parts.append(f"kto labels: {self.desirable} desirable, {self.undesirable} undesirable")
        return "; ".join(parts)

    def base(self) -> DataStats:
        """The plain :class:`DataStats` counters (without the preference fields)."""
        names = {f for f in DataStats.__dataclass_fields__}
        return DataStats(**{k: v for k, v in self.__dict__.items() if k in names})


@dataclass
class PreferenceSample:
    """One preference record: a prompt and its completions.

    Attributes:
        prompt: The prompt turns (OpenAI-style messages; the last is not an assistant turn).
        completions: ``[chosen, rejected]`` for a pair, ``[completion]`` for KTO: assistant messages.
        label: KTO's label (the completion is desirable); None for a pair.
        tools: JSON schemas of tools for the chat template, if any.
        source: The file it came from.
        line: Its line (or Parquet row).
    """

    prompt: list[dict[str, Any]]
    completions: list[dict[str, Any]]
    label: bool | None = None
    tools: list[dict[str, Any]] | None = None
    source: str | None = None
    line: int | None = None

    @property
    def is_pair(self) -> bool:
        """Whether it is a (chosen, rejected) pair (else a KTO sample)."""
        return self.label is None

    @property
    def chosen(self) -> dict[str, Any]:
        """The preferred completion (a pair's first; a KTO sample's only completion)."""
        return self.completions[0]

    @property
    def rejected(self) -> dict[str, Any]:
        """The rejected completion of a pair.

        Raises:
            DataError: A KTO sample has none.
        """
        if not self.is_pair:
            raise DataError("a KTO sample has no rejected completion", source=self.source, line=self.line)
        return self.completions[1]


class _Tie(DataError):
    """An UltraFeedback-style record whose best and worst scores are equal (always skipped, counted)."""


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


def _keys(record: Mapping[str, Any]) -> str:
    names = sorted(str(k) for k in record)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def detect_preference_format(record: Any, *, messages_field: str | None = None) -> PreferenceFormatName:
    """Tells the preference format of a record by its keys.

    Args:
        record: A record as read.
        messages_field: A custom key holding the prompt turns of the ``messages`` format.

    Returns:
        ``ultrafeedback`` (``completions``), ``kto`` (``completion`` and ``label``), ``messages``
        (``chosen``, ``rejected`` and a message list under ``messages`` without a ``prompt``) or
        ``trl`` (``chosen`` and ``rejected``).

    Raises:
        DataError: The record fits none of them.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"a preference record must be a JSON object, got {type(record).__name__}")
    if "completions" in record:
        return "ultrafeedback"
    if "completion" in record and "label" in record:
        return "kto"
    if "chosen" in record and "rejected" in record:
        key = messages_field or "messages"
        if "prompt" not in record and isinstance(record.get(key), list):
            return "messages"
        return "trl"
    raise DataError(
        f"cannot tell the preference format from the record's keys ({_keys(record)}): expected 'prompt', "
        "'chosen' and 'rejected' (TRL), 'messages' with 'chosen' and 'rejected' (OpenAI messages), "
        "'prompt' and 'completions' with scores (UltraFeedback), or 'prompt', 'completion' and 'label' "
        "(KTO)"
    )


def _check_messages(turns: Any, what: str, where: tuple[str, int]) -> list[dict[str, Any]]:
    source, line = where
    if not isinstance(turns, list):
        raise DataError(
            f"{what} must be a list of messages, got {type(turns).__name__}", source=source, line=line
        )
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{what}[{index}] must be an object with 'role' and 'content'", source=source, line=line
            )
        role = turn.get("role")
        if role not in CHAT_ROLES:
            raise DataError(
                f"unknown role {role!r} in {what}[{index}]; allowed roles: {', '.join(CHAT_ROLES)}",
                source=source,
                line=line,
            )
        content = turn.get("content")
        if content is None and not (role == "assistant" and turn.get("tool_calls")):
            raise DataError(f"{what}[{index}] ({role}) has no 'content'", source=source, line=line)
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(
                f"{what}[{index}] ({role}): 'content' must be a string or a list of content parts, got "
                f"{type(content).__name__}",
                source=source,
                line=line,
            )
        messages.append(dict(turn))
    return messages


def _prompt(value: Any, what: str, where: tuple[str, int]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{what} is empty", source=where[0], line=where[1])
        return [{"role": "user", "content": value}]
    messages = _check_messages(value, what, where)
    if not messages:
        raise DataError(f"{what} is empty", source=where[0], line=where[1])
    return messages


def _check_prompt_end(prompt: list[dict[str, Any]], where: tuple[str, int]) -> list[dict[str, Any]]:
    if prompt[-1]["role"] == "assistant":
        raise DataError(
            "the prompt ends with an assistant turn: the completion must be the assistant's reply to it",
            source=where[0],
            line=where[1],
        )
    return prompt


def _completion(value: Any, what: str, where: tuple[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A completion field: (turns that continue the prompt, the assistant message)."""
    source, line = where
    if isinstance(value, str):
        before: list[dict[str, Any]] = []
        message: dict[str, Any] = {"role": "assistant", "content": value}
    elif isinstance(value, Mapping):
        before = []
        message = {"role": "assistant", **value}
        message = _check_messages([message], what, where)[0]
    elif isinstance(value, list):
        turns = _check_messages(value, what, where)
        if not turns:
            raise EmptyTurnError(f"{what} is an empty list", source=source, line=line)
        before, message = turns[:-1], turns[-1]
    elif value is None:
        raise DataError(f"missing field {what!r}", source=source, line=line)
    else:
        raise DataError(
            f"{what} must be text, an assistant message or a list of messages, got {type(value).__name__}",
            source=source,
            line=line,
        )
    if message.get("role") != "assistant":
        raise DataError(
            f"{what} must end with an assistant turn, not a {message.get('role')!r} turn",
            source=source,
            line=line,
        )
    if not content_text(message.get("content")).strip() and not message.get("tool_calls"):
        raise EmptyTurnError(f"{what} is empty", source=source, line=line)
    return before, message


def _field(record: Mapping[str, Any], key: str, where: tuple[str, int], need: str) -> Any:
    if record.get(key) is None:
        raise DataError(
            f"missing field {key!r} ({need}; the record has: {_keys(record)})", source=where[0], line=where[1]
        )
    return record[key]


def _pair_from_fields(
    record: Mapping[str, Any], prompt: list[dict[str, Any]] | None, where: tuple[str, int], need: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    chosen_before, chosen = _completion(_field(record, "chosen", where, need), "chosen", where)
    rejected_before, rejected = _completion(_field(record, "rejected", where, need), "rejected", where)
    if chosen_before != rejected_before:
        raise DataError(
            "chosen and rejected continue the prompt with different turns before their last (assistant) "
            "turn; only the last turn may differ",
            source=where[0],
            line=where[1],
        )
    if prompt is None:  # TRL's implicit prompt: the shared turns before the completions
        if not chosen_before:
            raise DataError(
                f"missing field 'prompt' ({need}; or give chosen and rejected as whole conversations that "
                "share their turns before the last)",
                source=where[0],
                line=where[1],
            )
        prompt = []
    full_prompt = _check_prompt_end([*prompt, *chosen_before], where)
    if chosen == rejected:
        raise DataError(
            "chosen and rejected are identical: a pair must differ", source=where[0], line=where[1]
        )
    return full_prompt, [chosen, rejected]


def _score(completion: Mapping[str, Any]) -> float | None:
    for key in _SCORE_KEYS:
        value = completion.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # not NaN
            return float(value)
    return None


def _ultrafeedback(
    record: Mapping[str, Any], where: tuple[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    key = "prompt" if record.get("prompt") is not None else "instruction"
    prompt = _check_prompt_end(
        _prompt(
            _field(record, key, where, "an UltraFeedback record needs 'prompt' or 'instruction'"), key, where
        ),
        where,
    )
    completions = record.get("completions")
    if not isinstance(completions, list):
        raise DataError(
            "field 'completions' must be a list of scored responses", source=where[0], line=where[1]
        )
    scored: list[tuple[float, int, Any]] = []
    for index, item in enumerate(completions):
        if not isinstance(item, Mapping):
            raise DataError(
                f"completions[{index}] must be an object with 'response' and 'overall_score'",
                source=where[0],
                line=where[1],
            )
        score = _score(item)
        if score is not None:
            text = next((item[k] for k in _TEXT_KEYS if k in item), None)
            scored.append((score, index, text))
    if len(scored) < 2:
        raise DataError(
            f"{len(scored)} of {len(completions)} completions have a numeric score "
            f"({', '.join(_SCORE_KEYS)}); a pair needs two",
            source=where[0],
            line=where[1],
        )
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] == worst[0]:
        raise _Tie(f"all {len(scored)} completions score {best[0]:g}", source=where[0], line=where[1])
    out = []
    for score, index, text in (best, worst):
        if not isinstance(text, str):
            raise DataError(
                f"completions[{index}] (score {score:g}) needs a string 'response' or 'text'",
                source=where[0],
                line=where[1],
            )
        out.append(_completion(text, f"completions[{index}]", where)[1])
    if out[0] == out[1]:
        raise DataError(
            "the best and worst completions are identical: a pair must differ", source=where[0], line=where[1]
        )
    return prompt, out


def to_preference_samples(
    raw: RawRecord, fmt: PreferenceFormatName, *, unpaired: bool = False, messages_field: str | None = None
) -> list[PreferenceSample]:
    """Converts one record of a known preference format.

    Args:
        raw: The record and where it came from.
        fmt: Its format.
        unpaired: Return KTO samples: a pair becomes its chosen (``label=True``) and its rejected
            (``label=False``). Else a ``kto`` record is an error.
        messages_field: The key of the prompt turns of the ``messages`` format (None: ``messages``).

    Returns:
        One sample (a pair, or a KTO sample), or two KTO samples for an unpaired pair.

    Raises:
        EmptyTurnError: A completion is empty.
        DataError: A missing or mistyped field, an unknown role, a prompt ending with an assistant
            turn, chosen identical to rejected, no two scored completions; ties raise a private
            subclass (skipped and counted by :func:`iter_preference_samples`).
    """
    where = (raw.source, raw.line)
    record = raw.record
    if not isinstance(record, Mapping):
        raise DataError(
            f"a preference record must be a JSON object, got {type(record).__name__}",
            source=where[0],
            line=where[1],
        )
    tools = _tools(record, where)

    def sample(
        prompt: list[dict[str, Any]], completions: list[dict[str, Any]], label: bool | None
    ) -> PreferenceSample:
        return PreferenceSample(prompt, completions, label, tools, raw.source, raw.line)

    if fmt == "kto":
        if not unpaired:
            raise DataError(
                "a KTO record (prompt, completion, label) is unpaired: read it with data.format=kto",
                source=where[0],
                line=where[1],
            )
        need = "a KTO record needs 'prompt', 'completion' and 'label'"
        prompt = _prompt(_field(record, "prompt", where, need), "prompt", where)
        before, completion = _completion(_field(record, "completion", where, need), "completion", where)
        label = _field(record, "label", where, need)
        if not isinstance(label, bool):
            raise DataError(
                f"field 'label' must be true or false, got {label!r}", source=where[0], line=where[1]
            )
        return [sample(_check_prompt_end([*prompt, *before], where), [completion], label)]
    if fmt == "trl":
        need = "a TRL preference record needs 'prompt', 'chosen' and 'rejected'"
        given = record.get("prompt")
        given_prompt = None if given is None else _prompt(given, "prompt", where)
        prompt, pair = _pair_from_fields(record, given_prompt, where, need)
    elif fmt == "messages":
        key = messages_field or "messages"
        need = f"an OpenAI-messages preference record needs {key!r}, 'chosen' and 'rejected'"
        prompt = _prompt(_field(record, key, where, need), key, where)
        prompt, pair = _pair_from_fields(record, prompt, where, need)
    elif fmt == "ultrafeedback":
        prompt, pair = _ultrafeedback(record, where)
    else:
        raise DataError(f"unknown preference format {fmt!r}; expected trl, messages, ultrafeedback or kto")
    if unpaired:
        return [sample(prompt, [pair[0]], True), sample(prompt, [pair[1]], False)]
    return [sample(prompt, pair, None)]


def _mode(config: DataConfig, format: str | None) -> str:
    mode = format if format is not None else config.format
    if mode not in PREFERENCE_MODES:
        raise DataError(
            f"data.format {mode!r} is not a preference format; use one of {', '.join(PREFERENCE_MODES)} "
            "(preference or auto: paired rows; kto: unpaired rows)"
        )
    return mode


def iter_preference_samples(
    files: Sequence[str | Path],
    config: DataConfig,
    *,
    format: str | None = None,
    stats: PreferenceStats | None = None,
) -> Iterator[PreferenceSample]:
    """Streams the preference samples of data files (see the module docs for formats and modes).

    Args:
        files: The data files (``.jsonl``, ``.json``, ``.parquet``; see
            :func:`~lmstack.train.data.resolve_data_files`).
        config: ``format`` (unless ``format`` is given), ``messages_field``, ``on_malformed`` and
            ``on_empty_assistant`` are used.
        format: The mode, overriding ``config.format``: ``auto``/``preference`` (pairs), ``kto``
            (unpaired), or a paired format's name.
        stats: Counters to update (``files``, ``records``, ``skipped_*``, ``ties``, ``formats``).

    Yields:
        Pairs (or KTO samples), file by file, in file order.

    Raises:
        DataError: A malformed record under ``on_malformed="fail"``, an empty completion under
            ``on_empty_assistant="fail"``, a file whose format cannot be told, a text file, or KTO
            rows read as pairs.
    """
    mode = _mode(config, format)
    unpaired = mode == "kto"
    stats = stats if stats is not None else PreferenceStats()
    for file in files:
        path = Path(file)
        if path.name.lower().endswith((".txt", ".txt.gz")):
            raise DataError(f"{path}: a .txt file holds plain text, not preference pairs")
        fmt: PreferenceFormatName | None = mode if mode in ("trl", "messages", "ultrafeedback") else None  # type: ignore[assignment]
        skip_empty = SkipPolicy(config.on_empty_assistant, "data.on_empty_assistant")
        skip_malformed = SkipPolicy(config.on_malformed, "data.on_malformed")
        for raw in read_records(path, on_malformed=config.on_malformed, stats=stats):
            if fmt is None:
                try:
                    fmt = detect_preference_format(raw.record, messages_field=config.messages_field)
                except DataError as exc:
                    raise DataError(exc.detail, source=raw.source, line=raw.line) from None
                if fmt == "kto" and not unpaired:
                    raise DataError(
                        "the file holds unpaired KTO rows (prompt, completion, label); set data.format: kto",
                        source=raw.source,
                        line=raw.line,
                    )
                logger.info("%s: %s preference format", path, fmt)
            try:
                samples = to_preference_samples(
                    raw, fmt, unpaired=unpaired, messages_field=config.messages_field
                )
            except _Tie as exc:
                stats.ties += 1
                logger.debug("skipping a tie at %s:%s: %s", exc.source, exc.line, exc.detail)
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
            yield from samples
        if stats.ties:
            logger.info("%s: %d tied records skipped so far", path, stats.ties)


# ------------------------------------------------------------------------------------------------
# tokenizing
# ------------------------------------------------------------------------------------------------


@dataclass
class TokenizedPreference:
    """A preference sample's tokens: the shared prompt, and each completion's tokens after it.

    Attributes:
        prompt_ids: The prompt rendered with the generation prompt, ``int32``.
        completion_ids: Each completion's tokens (the reply and its end-of-turn token), ``int32``:
            ``[chosen, rejected]`` or ``[completion]``.
        label: KTO's label; None for a pair.
    """

    prompt_ids: NDArray[np.int32]
    completion_ids: list[NDArray[np.int32]]
    label: bool | None = None

    @property
    def is_pair(self) -> bool:
        """Whether it is a pair."""
        return self.label is None

    def sequence(self, k: int) -> TokenizedSample:
        """Prompt + completion ``k`` as one sequence, the loss on the completion's tokens only."""
        ids = np.concatenate([self.prompt_ids, self.completion_ids[k]]).astype(np.int32)
        mask = np.zeros(ids.shape[0], dtype=np.bool_)
        mask[self.prompt_ids.shape[0] :] = True
        mask[0] = False
        return TokenizedSample(input_ids=ids, loss_mask=mask, is_chat=True)

    @property
    def lengths(self) -> list[int]:
        """The length of each sequence (prompt + completion)."""
        return [int(self.prompt_ids.shape[0] + c.shape[0]) for c in self.completion_ids]


@dataclass
class _Rendered:
    prompt: str
    full: list[str]  # prompt + each completion, trailing whitespace dropped
    label: bool | None
    source: str | None
    line: int | None


class PreferenceTokenizer:
    """Renders and tokenizes :class:`PreferenceSample` objects (see the module docs).

    Args:
        tokenizer: The model's tokenizer (its chat template is used).
        chat_template: A template name among the tokenizer's, or a template's text; None for its
            default.
    """

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._backend = tokenizer.backend_tokenizer
        # Rendering (and probing whether the template honours add_generation_prompt) as for SFT.
        self._chat = SampleTokenizer(tokenizer, add_eos=False, chat_template=chat_template)
        self._render = self._chat._render
        self._supports_generation_prompt = self._chat._supports_generation_prompt

    def _render_sample(self, sample: PreferenceSample) -> _Rendered:
        prompt = self._render(sample.prompt, True, sample.tools)
        fulls = []
        starts = []
        for k, completion in enumerate(sample.completions):
            full = self._render([*sample.prompt, completion], False, sample.tools).rstrip()
            if not full.startswith(prompt):
                k_name = ("chosen", "rejected")[k] if sample.is_pair else "completion"
                raise ChatTemplateError(
                    f"the chat template is not prefix-stable: the prompt rendered with the generation prompt "
                    f"is not a prefix of the prompt followed by the {k_name} completion "
                    f"({_difference(prompt, full)}). The completion's tokens are found as what follows the "
                    "prompt, which needs a template that renders the last assistant turn like the generation "
                    "prompt plus the reply (some reasoning templates add or drop text there). Use another "
                    "template (data.chat_template).",
                    source=sample.source,
                    line=sample.line,
                )
            if not self._supports_generation_prompt():
                text = content_text(completion.get("content"))
                found = -1
                for needle in (text, text.strip()):
                    if needle and found < 0:
                        found = full.find(needle, len(prompt))
                starts.append(found if found >= 0 else len(prompt))
            fulls.append(full)
        if starts:  # the assistant header the template writes is part of the prompt
            heads = {full[:start] for full, start in zip(fulls, starts, strict=True)}
            if len(heads) != 1:
                raise ChatTemplateError(
                    "the chat template ignores add_generation_prompt and renders the completions' turns with "
                    "different headers, so their shared prompt cannot be found; use a template that supports "
                    "add_generation_prompt (data.chat_template)",
                    source=sample.source,
                    line=sample.line,
                )
            prompt = heads.pop()
        return _Rendered(prompt, fulls, sample.label, sample.source, sample.line)

    def render(self, sample: PreferenceSample) -> _Rendered:
        """Renders a sample to its prompt text and each prompt+completion text.

        Raises:
            ChatTemplateError: The template is not prefix-stable on the sample.
            DataError: The template refuses the conversation.
        """
        try:
            return self._render_sample(sample)
        except LMStackError as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"the chat template refused the conversation: {exc}", source=sample.source, line=sample.line
            ) from exc

    def encode_each(self, rendered: Sequence[_Rendered]) -> list[TokenizedPreference | DataError]:
        """Tokenizes rendered samples in one batched call; a record that cannot be split is an error.

        Returns:
            A tokenized sample each, or the :class:`DataError` of a record whose prompt tokens are not
            a prefix of its prompt+completion tokens.
        """
        if not rendered:
            return []
        texts: list[str] = []
        for item in rendered:
            texts.append(item.prompt)
            texts.extend(item.full)
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        out: list[TokenizedPreference | DataError] = []
        at = 0
        for item in rendered:
            prompt = np.asarray(encodings[at].ids, dtype=np.int32)
            at += 1
            completions: list[NDArray[np.int32]] = []
            error: DataError | None = None
            for full_text in item.full:
                full = np.asarray(encodings[at].ids, dtype=np.int32)
                at += 1
                n = prompt.shape[0]
                if error is not None:
                    continue
                if full.shape[0] <= n or not np.array_equal(full[:n], prompt):
                    error = DataError(
                        "the prompt's tokens are not a prefix of the prompt+completion tokens: the tokenizer "
                        "merges the end of the prompt with the start of the completion "
                        f"({full_text[len(item.prompt) : len(item.prompt) + 20]!r}); strip the completion's "
                        "leading whitespace",
                        source=item.source,
                        line=item.line,
                    )
                    continue
                completions.append(full[n:])
            out.append(error if error is not None else TokenizedPreference(prompt, completions, item.label))
        return out

    def __call__(self, samples: Sequence[PreferenceSample]) -> list[TokenizedPreference]:
        """Renders and tokenizes samples (errors raise).

        Raises:
            ChatTemplateError: The template is not prefix-stable.
            DataError: The template refuses a sample, or the tokens do not split at the prompt.
        """
        out = []
        for item in self.encode_each([self.render(s) for s in samples]):
            if isinstance(item, DataError):
                raise item
            out.append(item)
        return out


def _difference(a: str, b: str) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {k}: {a[max(0, k - 20) : k + 40]!r} vs {b[max(0, k - 20) : k + 40]!r}"


# ------------------------------------------------------------------------------------------------
# the tokenized dataset and its cache
# ------------------------------------------------------------------------------------------------


class TokenizedPreferences:
    """Tokenized preference samples: the SFT cache layout plus each sequence's prompt length and role.

    Unit ``i`` (a pair, or a KTO sample) is stored as sequences ``2i, 2i+1`` (pairs) or ``i`` (KTO).
    Build one with :func:`tokenize_preferences`, or open a cache entry with :meth:`open`.

    Attributes:
        data: The sequences (a :class:`~lmstack.train.data.TokenizedDataset`).
        paired: Whether units are pairs (else KTO samples).
        stats: What preparation read, skipped and tied.
        cache_hit: Whether it was reused from the cache.
    """

    def __init__(self, directory: str | os.PathLike[str], *, cache_hit: bool = False) -> None:
        self.data = TokenizedDataset(directory, cache_hit=cache_hit)
        meta = self.data._meta.get("preference")
        if not isinstance(meta, dict) or meta.get("version") != PREFERENCE_CACHE_VERSION:
            raise DataError(f"{directory} is not a tokenized preference dataset")
        self.paired = bool(meta["paired"])
        self.stats = PreferenceStats(**meta["stats"])
        self.cache_hit = cache_hit
        self.per_unit = 2 if self.paired else 1
        info = np.fromfile(Path(directory) / "preference.bin", dtype=np.int32)
        if info.shape[0] != 2 * self.data.num_samples:
            raise DataError(f"{directory}: preference.bin is truncated")
        info = info.reshape(-1, 2)
        self.prompt_lengths: NDArray[np.int64] = info[:, 0].astype(np.int64)
        """The prompt length of every sequence."""
        self.roles: NDArray[np.int64] = info[:, 1].astype(np.int64)
        """The role of every sequence (0 chosen, 1 rejected, 2 undesirable, 3 desirable)."""

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TokenizedPreferences:
        """Opens a cache entry.

        Raises:
            DataError: The directory is missing, incomplete, corrupt, or not preference data.
        """
        path = Path(directory)
        if not _sizes_ok(path) or not (path / "preference.bin").is_file():
            raise DataError(f"{path} is not a complete tokenized preference dataset")
        return cls(path, cache_hit=True)

    def __len__(self) -> int:
        return self.data.num_samples // self.per_unit

    @property
    def key(self) -> str:
        """The cache key of this tokenized data (:func:`preference_cache_key`), for caches derived from it."""
        return str(self.data._meta.get("key", ""))

    @property
    def sequence_lengths(self) -> NDArray[np.int64]:
        """``[units, 2]`` (pairs) or ``[units, 1]`` (KTO): each sequence's length."""
        return self.data.lengths.reshape(-1, self.per_unit)

    @property
    def labels(self) -> NDArray[np.bool_]:
        """KTO: each sample's label (True: desirable). Pairs: all True."""
        return self.roles.reshape(-1, self.per_unit)[:, 0] != ROLE_UNDESIRABLE

    def __getitem__(self, index: int) -> TokenizedPreference:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"unit {index} out of range for {n}")
        index %= n
        first = index * self.per_unit
        prompt_length = int(self.prompt_lengths[first])
        completions = []
        prompt = np.zeros(0, dtype=np.int32)
        for k in range(self.per_unit):
            sequence = self.data[first + k]
            prompt = sequence.input_ids[:prompt_length]
            completions.append(sequence.input_ids[prompt_length:])
        label = None if self.paired else bool(self.roles[first] == ROLE_DESIRABLE)
        return TokenizedPreference(prompt, completions, label)

    def __repr__(self) -> str:
        kind = "pairs" if self.paired else "kto samples"
        return f"TokenizedPreferences({str(self.data.directory)!r}, {kind}={len(self)})"


def preference_cache_key(files: list[Path], tokenizer: Tokenizer, config: DataConfig, mode: str) -> str:
    """The SFT :func:`~lmstack.train.data._cache.cache_key`, extended with the preference mode."""
    base = cache_key(files, tokenizer, config)
    payload = json.dumps([base, "preference", PREFERENCE_CACHE_VERSION, mode])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:40]


def _tokenize_into(
    directory: Path,
    files: list[Path],
    tokenizer: Tokenizer,
    config: DataConfig,
    mode: str,
    key: str,
    show_progress: bool | None,
) -> None:
    stats = PreferenceStats()
    preference_tokenizer = PreferenceTokenizer(tokenizer, chat_template=config.chat_template)
    writer = _Writer(directory)
    info: list[int] = []
    skip_malformed = SkipPolicy(config.on_malformed, "data.on_malformed")
    paired = mode != "kto"
    try:
        progress = tqdm(
            desc="tokenizing preferences",
            unit=" samples",
            disable=None if show_progress is None else not show_progress,
        )
        with progress:
            for batch in _batches(iter_preference_samples(files, config, format=mode, stats=stats), _BATCH):
                rendered = []
                for sample in batch:
                    try:
                        rendered.append(preference_tokenizer.render(sample))
                    except ChatTemplateError:
                        raise
                    except DataError as exc:
                        skip_malformed(exc)
                        stats.skipped_malformed += 1
                for item in preference_tokenizer.encode_each(rendered):
                    if isinstance(item, DataError):
                        skip_malformed(item)
                        stats.skipped_malformed += 1
                        continue
                    for k in range(len(item.completion_ids)):
                        writer.add(item.sequence(k))
                        kto_role = ROLE_DESIRABLE if item.label else ROLE_UNDESIRABLE
                        role = k if item.label is None else kto_role
                        info.extend((int(item.prompt_ids.shape[0]), role))
                    if item.label is not None:
                        if item.label:
                            stats.desirable += 1
                        else:
                            stats.undesirable += 1
                    stats.samples += 1
                progress.update(len(batch))
        if stats.samples == 0:
            raise DataError(
                f"no usable preference samples in {len(files)} data file(s) ({stats.records} records, "
                f"{stats.skipped_malformed} malformed, {stats.skipped_empty} empty, "
                f"{stats.ties} tied skipped)"
            )
        stats.tokens = writer.num_tokens
        stats.loss_tokens = writer.num_loss_tokens
        np.asarray(info, dtype=np.int32).tofile(directory / "preference.bin")
        plain = {k: v for k, v in stats.base().as_dict().items() if k != "padding_ratio"}
        full = {k: v for k, v in stats.as_dict().items() if k != "padding_ratio"}
        writer.finish(
            {
                "version": CACHE_VERSION,
                "key": key,
                "complete": True,
                "num_samples": len(writer.offsets) - 1,
                "num_tokens": writer.num_tokens,
                "num_loss_tokens": writer.num_loss_tokens,
                "files": [str(f) for f in files],
                "tokenizer": tokenizer.name_or_path,
                "stats": plain,
                "preference": {
                    "version": PREFERENCE_CACHE_VERSION,
                    "paired": paired,
                    "mode": mode,
                    "stats": full,
                },
            }
        )
    finally:
        writer.close()


def _entry_ok(directory: Path) -> bool:
    if not _sizes_ok(directory):
        return False
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        size = (directory / "preference.bin").stat().st_size
    except (OSError, ValueError):
        return False
    return size == 8 * int(meta["num_samples"]) and isinstance(meta.get("preference"), dict)


def tokenize_preferences(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    format: str | None = None,
    show_progress: bool | None = None,
) -> TokenizedPreferences:
    """Reads and tokenizes the preference data of ``config``, or reuses the cached result.

    The cache is the SFT one (``config.cache_dir``; a temporary directory removed with the dataset
    when None), keyed by the data files, the tokenizer, its templates, the format fields, the error
    policies and the preference mode.

    Args:
        config: The data config (``paths``, ``format``, ``chat_template``, ``cache_dir``, policies).
        tokenizer: The model's tokenizer.
        format: The preference mode, overriding ``config.format`` (``preference``, ``kto`` ...).
        show_progress: Show a progress bar (None: only on a terminal).

    Returns:
        The tokenized pairs (or KTO samples).

    Raises:
        DataError: Missing files, a malformed record (``on_malformed="fail"``), an empty completion
            (``on_empty_assistant="fail"``), no usable sample, or an unwritable cache directory.
        ChatTemplateError: The chat template is not prefix-stable.
    """
    mode = _mode(config, format)
    files = resolve_data_files(config.paths)
    key = preference_cache_key(files, tokenizer, config, mode)
    if config.cache_dir is None:
        directory = Path(tempfile.mkdtemp(prefix="lmstack-preferences-"))
        try:
            _tokenize_into(directory, files, tokenizer, config, mode, key, show_progress)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        dataset = TokenizedPreferences(directory)
        _remove_on_collect(dataset.data, directory)
        logger.info("tokenized preferences: %s", dataset.stats.summary())
        return dataset
    final = Path(config.cache_dir).expanduser() / key
    if final.is_dir():
        if _entry_ok(final):
            logger.info("reusing pre-tokenized preference data from %s", final)
            return TokenizedPreferences(final, cache_hit=True)
        logger.warning("the cache entry %s is incomplete or corrupt: tokenizing again", final)
    try:
        with atomic_directory(final) as staging:
            _tokenize_into(staging, files, tokenizer, config, mode, key, show_progress)
    except OSError as exc:
        if not _entry_ok(final):
            raise DataError(f"cannot write the cache entry {final}: {exc}") from exc
        logger.info("another process cached %s first; using its copy", final)
    dataset = TokenizedPreferences(final)
    logger.info("tokenized preferences into %s: %s", final, dataset.stats.summary())
    return dataset
