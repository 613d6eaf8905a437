"""Needle in a haystack, with lengths and depths counted in the tested model's own tokens.

For each cell of a length x depth grid and each needle, a document of exactly ``length`` tokens (of the
model's tokenizer) is cut from the haystack (the world's articles, or any texts) with the needle
sentence put at the sentence boundary at or before ``depth`` of the way through; the model reads it and
answers the needle's question greedily, and is right when the reply names the needle's value.
:func:`needle_grid` turns per-document scores into a :class:`NeedleGrid` (a depth x length table).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmstack.eval._errors import DatasetError, TaskConfigError
from lmstack.eval.tasks._config import ChatConfig, DatasetConfig, GenerationKwargs, MetricConfig, TaskConfig
from lmstack.eval.tasks._task import Task
from lmstack.eval.tasks.builtin._base import Doc

__all__ = [
    "DEFAULT_NEEDLES",
    "Needle",
    "NeedleGrid",
    "NeedleTask",
    "TokenizerLike",
    "needle_grid",
    "needle_task",
    "read_haystack",
]

DEFAULT_PROMPT = (
    "Answer the question using only the context.\n\nContext:\n{{document}}\n\nQuestion: {{question}}"
)


class TokenizerLike(Protocol):
    """What the needle task needs of a tokenizer (:class:`lmstack.core.tokenizer.Tokenizer` has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        ...


@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack and the question that asks for it.

    Attributes:
        fact: The sentence inserted.
        question: The question asked after the document.
        answer: The value a right reply names.
    """

    fact: str
    question: str
    answer: str


DEFAULT_NEEDLES = (
    Needle(
        "The secret number of the Orvell lighthouse is 4817.",
        "What is the secret number of the Orvell lighthouse?",
        "4817",
    ),
)
"""One needle that no world article states (invented words, an invented number)."""


@dataclass(frozen=True)
class NeedleGrid:
    """Scores over the grid, ready for a table or a heatmap.

    Attributes:
        lengths: The document lengths in tokens (columns).
        depths: The needle depths, 0 (start) to 1 (end) (rows).
        scores: ``scores[i][j]``: the mean score at ``depths[i]`` and ``lengths[j]`` (NaN when unscored).
        counts: How many documents each cell's score averages.
    """

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    scores: list[list[float]]
    counts: list[list[int]]

    def rows(self) -> list[list[Any]]:
        """The table as rows: a header (``depth``, then each length), then each depth and its scores."""
        header: list[Any] = ["depth", *self.lengths]
        return [header, *([depth, *row] for depth, row in zip(self.depths, self.scores, strict=True))]

    def mean(self) -> float:
        """The mean over every scored cell."""
        values = [v for row in self.scores for v in row if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan


def read_haystack(*sources: str | os.PathLike[str]) -> list[str]:
    """Haystack texts from files.

    Args:
        *sources: A world folder (its ``articles.jsonl``), a JSON-lines file (each row's ``text``), or any
            other text file (its whole text).
    """
    texts: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            path = path / "articles.jsonl"
        if not path.is_file():
            raise DatasetError(f"haystack file {path} does not exist", path=path)
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DatasetError(
                        f"{path}:{number}: a haystack row needs a JSON object with a 'text' ({err})",
                        path=path,
                        line=number,
                    ) from err
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts


class NeedleTask(Task):
    """The needle documents, one per (length, depth, needle), in that order; a :class:`Task` like any other.

    Build it with :func:`needle_task`. Each document has ``length``, ``depth`` (asked), ``needle_depth``
    (where the needle landed, as a share of the haystack tokens), ``document``, ``question`` and ``answer``.
    """

    def __init__(
        self, config: TaskConfig, docs: Sequence[Doc], lengths: Sequence[int], depths: Sequence[float]
    ) -> None:
        super().__init__(config)
        self._cells = list(docs)
        self.lengths = tuple(lengths)
        self.depths = tuple(depths)

    def _read(self, split: str) -> list[Doc]:
        return self._cells

    def grid(self, scores: Mapping[int, float] | Sequence[float]) -> NeedleGrid:
        """:func:`needle_grid` of this task."""
        return needle_grid(self, scores)


def _boundaries(tokenizer: TokenizerLike, ids: Sequence[int]) -> list[int]:
    """Token positions right after a sentence or paragraph ends (0 included): where a needle may go."""
    marks = [0]
    for i, token in enumerate(ids, start=1):
        if tokenizer.decode([token]).rstrip(" ").endswith((".", "\n")):
            marks.append(i)
    return marks


def _haystack_ids(tokenizer: TokenizerLike, texts: Sequence[str], needed: int) -> list[int]:
    text = "\n\n".join(texts)
    if not text.strip():
        raise TaskConfigError("the needle haystack is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < needed:
        # Too short: the haystack repeated, still cut from one encoding of the whole.
        repeats = needed // max(len(ids), 1) + 1
        ids = tokenizer.encode("\n\n".join([text] * repeats), add_special_tokens=False)
    return ids


def needle_task(
    tokenizer: TokenizerLike,
    haystack: Iterable[str],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    needles: Sequence[Needle] = DEFAULT_NEEDLES,
    name: str = "needle",
    prompt: str = DEFAULT_PROMPT,
    chat: bool = True,
    max_gen_toks: int = 32,
) -> NeedleTask:
    """The needle-in-a-haystack task over a length x depth grid, in the tested model's tokens.

    Args:
        tokenizer: The tested model's tokenizer (``llm.tokenizer``): lengths and depths count its tokens.
        haystack: The filler texts, joined by blank lines (see :func:`read_haystack`).
        lengths: Document lengths in tokens (haystack and needle; the prompt around it is extra).
        depths: Where the needle goes, as a share of the haystack, 0 (start) to 1 (end).
        needles: The facts hidden (one document per needle in every cell; a cell's score is their mean).
        name: The task's name.
        prompt: A jinja2 template over ``document`` and ``question``.
        chat: Ask through the model's chat template (else a plain completion prompt).
        max_gen_toks: The longest reply.

    Raises:
        TaskConfigError: An empty grid or haystack, a depth outside [0, 1], or a length too short to
            hold a needle.
    """
    if not lengths or not depths or not needles:
        raise TaskConfigError("the needle grid needs at least one length, one depth and one needle")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise TaskConfigError(f"needle depths are shares of the document in [0, 1], got {depth}")
    encoded = [tokenizer.encode(" " + needle.fact, add_special_tokens=False) for needle in needles]
    ids = _haystack_ids(tokenizer, list(haystack), max(lengths))
    marks = _boundaries(tokenizer, ids)
    docs: list[Doc] = []
    for length in lengths:
        for depth in depths:
            for needle, needle_ids in zip(needles, encoded, strict=True):
                size = length - len(needle_ids)
                if size < 1:
                    raise TaskConfigError(
                        f"length {length} cannot hold the needle {needle.fact!r} ({len(needle_ids)} tokens) "
                        "and any haystack"
                    )
                target = math.floor(depth * size)
                position = size if depth >= 1.0 else max(m for m in marks if m <= target)
                tokens = [*ids[:position], *needle_ids, *ids[position:size]]
                docs.append(
                    {
                        "length": length,
                        "depth": depth,
                        "needle_depth": position / size,
                        "document": tokenizer.decode(tokens),
                        "needle": needle.fact,
                        "question": needle.question,
                        "answer": needle.answer,
                    }
                )
    config = TaskConfig(
        name=name,
        dataset=DatasetConfig(format="jsonl", data_files={"test": ()}),
        output_type="generate_until",
        doc_to_text=prompt,
        doc_to_target="answer",
        generation=GenerationKwargs(until=(), max_gen_toks=max_gen_toks),
        metrics=(MetricConfig("contains"),),
        chat=ChatConfig() if chat else None,
    )
    return NeedleTask(config, docs, lengths, depths)


def needle_grid(task: NeedleTask, scores: Mapping[int, float] | Sequence[float]) -> NeedleGrid:
    """Per-document scores (doc id -> score, e.g. a run's ``contains`` items) as a depth x length grid.

    Args:
        task: The needle task the scores are of.
        scores: Each scored document's score, by doc id (a sequence: doc id = index).
    """
    by_id = scores if isinstance(scores, Mapping) else dict(enumerate(scores))
    sums = {(d, n): 0.0 for d in task.depths for n in task.lengths}
    counts = dict.fromkeys(sums, 0)
    for doc_id, score in by_id.items():
        doc = task.docs[doc_id]
        cell = (doc["depth"], doc["length"])
        sums[cell] += float(score)
        counts[cell] += 1
    return NeedleGrid(
        lengths=task.lengths,
        depths=task.depths,
        scores=[
            [sums[d, n] / counts[d, n] if counts[d, n] else math.nan for n in task.lengths]
            for d in task.depths
        ],
        counts=[[counts[d, n] for n in task.lengths] for d in task.depths],
    )
