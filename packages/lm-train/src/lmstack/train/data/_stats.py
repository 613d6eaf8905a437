"""Counters of what happened to the data on its way to batches, reported at the end of preparation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataStats"]


@dataclass
class DataStats:
    """What the data pipeline read, kept, cut and padded.

    Attributes:
        files: Data files read.
        records: Records read from them (well-formed or not).
        samples: Samples tokenized (records that became a conversation or a document).
        skipped_malformed: Records skipped as malformed (``on_malformed="skip"``): bad JSON, missing
            fields, unknown roles, a conversation not ending with an assistant turn, a template
            refusing the conversation.
        skipped_empty: Samples skipped for an empty assistant turn (``on_empty_assistant="skip"``) or
            an empty document.
        formats: Samples per detected format.
        truncated: Samples longer than ``max_length`` that were cut (or, with ``split``, the number of
            documents split into pieces).
        dropped: Samples longer than ``max_length`` that were left out.
        no_loss: Samples left out because truncation left them no token to train on.
        pieces: Sequences that went into bins or batches (samples, plus the extra pieces of split
            documents).
        bins: Packed bins (0 when not packing).
        tokens: Real (non-padding) tokens in the bins or samples.
        loss_tokens: Tokens whose label is trained on.
        padding: Padding tokens in the bins.
    """

    files: int = 0
    records: int = 0
    samples: int = 0
    skipped_malformed: int = 0
    skipped_empty: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped: int = 0
    no_loss: int = 0
    pieces: int = 0
    bins: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding: int = 0

    @property
    def padding_ratio(self) -> float:
        """Padding tokens over all bin tokens (0 with no bins)."""
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters, plus ``padding_ratio``, as plain data (for JSON logs)."""
        out = dataclasses.asdict(self)
        out["padding_ratio"] = self.padding_ratio
        return out

    def summary(self) -> str:
        """A one-line report, such as the end of data preparation logs."""
        parts = [f"{self.samples} samples from {self.records} records in {self.files} files"]
        if self.formats:
            parts.append("formats " + ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())))
        skipped = {
            "malformed": self.skipped_malformed,
            "empty": self.skipped_empty,
            "dropped (too long)": self.dropped,
            "dropped (no loss left)": self.no_loss,
        }
        if any(skipped.values()):
            parts.append("skipped " + ", ".join(f"{v} {k}" for k, v in skipped.items() if v))
        if self.truncated:
            parts.append(f"{self.truncated} over-length cut")
        parts.append(f"{self.tokens} tokens ({self.loss_tokens} trained on)")
        if self.bins:
            parts.append(f"{self.bins} bins, padding {self.padding_ratio:.2%}")
        return "; ".join(parts)
