"""The data section of a training config: where the data is and how it becomes token batches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from lmstack.train.data._errors import TrainConfigError

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token batches.

    Attributes:
        paths: Data files, directories (searched recursively for supported files) or glob patterns:
            ``.jsonl``, ``.json`` (a JSON array, or JSON Lines when it starts with ``{``),
            ``.parquet`` (needs ``lmstack-train[parquet]``) and ``.txt``; ``.gz`` variants of the
            text formats too.
        format: ``alpaca``, ``sharegpt``, ``messages`` (OpenAI chat), ``text``, or ``auto`` to decide
            per file from its first record. The preference recipes read ``preference`` (paired rows
            in any of the formats ``trl``, ``messages`` with two endings, ``ultrafeedback``, decided
            per file; or one of those names to insist on it) and ``kto`` (unpaired rows); there
            ``messages`` means OpenAI messages with two assistant endings.
        text_field: The record key holding the document, for the ``text`` format.
        messages_field: The record key holding the conversation; None means the format's usual key
            (``messages`` for OpenAI messages, ``conversations`` for ShareGPT).
        txt_mode: How a ``.txt`` file splits into documents: one per blank-line-separated
            ``paragraph``, one per ``line``, or the whole ``file``.
        chat_template: The name of one of the tokenizer's chat templates, or a template's text;
            None for the tokenizer's default.
        train_on: ``assistant`` puts the loss on the assistant turns only (their content and the
            end-of-turn token that follows); ``all`` trains on every token.
        add_eos: End each ``text`` document with the eos token.
        max_length: Tokens per packed bin, and the longest sample kept whole.
        pack: Pack samples into bins of ``max_length`` tokens (else: padded batches, one sample a row).
        pack_window: Best-fit packing looks at this many consecutive (shuffled) samples at a time.
        on_overflow: A sample longer than ``max_length`` is cut to its first ``max_length`` tokens
            (``truncate``), left out (``drop``), or, for text documents, split into consecutive
            pieces (``split``; chats are truncated).
        on_malformed: A malformed record (bad JSON, missing fields, unknown role, a conversation that
            does not end with an assistant turn, a template refusing it) stops the run naming its file
            and line (``fail``) or is skipped and counted (``skip``).
        on_empty_assistant: A conversation with an empty assistant turn fails the run or is skipped
            and counted.
        cache_dir: Where pre-tokenized data is kept between runs; None tokenizes into a temporary
            directory removed at exit.
        shuffle: Shuffle samples before packing and the batches every epoch (else both keep the
            order of the files).
        shuffle_seed: The seed of that shuffling: the data order depends on it alone, not on
            ``run.seed`` (which seeds the model's initialisation), so the two can be varied apart.
    """

    paths: list[str] = field(default_factory=list)
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "text", "preference", "kto", "trl", "ultrafeedback"
    ] = "auto"
    text_field: str = "text"
    messages_field: str | None = None
    txt_mode: Literal["paragraph", "line", "file"] = "paragraph"
    chat_template: str | None = None
    train_on: Literal["assistant", "all"] = "assistant"
    add_eos: bool = True
    max_length: int = 2048
    pack: bool = True
    pack_window: int = 1024
    on_overflow: Literal["truncate", "drop", "split"] = "truncate"
    on_malformed: Literal["skip", "fail"] = "fail"
    on_empty_assistant: Literal["skip", "fail"] = "fail"
    cache_dir: str | None = None
    shuffle: bool = True
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [os.fspath(self.paths)]
        else:
            self.paths = [os.fspath(p) for p in self.paths]
        if self.max_length < 2:
            raise TrainConfigError(
                f"data.max_length must be at least 2 tokens, got {self.max_length}", field="data.max_length"
            )
        if self.pack_window < 1:
            raise TrainConfigError(
                f"data.pack_window must be at least 1, got {self.pack_window}", field="data.pack_window"
            )
        if not self.text_field:
            raise TrainConfigError("data.text_field must not be empty", field="data.text_field")
