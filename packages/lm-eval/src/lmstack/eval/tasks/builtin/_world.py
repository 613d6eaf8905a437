"""Tasks over the bundled world (``examples/world``), read from the files its generator writes.

The library never imports the generator: ``data_dir`` is the folder ``generate.py --out`` wrote
(``heldout.jsonl``, ``context_chats.jsonl``, ...). Every prompt is a chat (the world's default model is
finetuned on chats), so a model is asked as the quickstart asks it.

The held-out closed-book questions are scored three ways, to be read side by side:

* ``world_heldout_mc``: the answer *value*'s log-likelihood right after the question, against the
  three other candidate values (lm-evaluation-harness's multiple choice);
* ``world_heldout_statements``: the likelihood of whole answer *statements* (every sentence template
  of the attribute, filled in with each candidate), what the quickstart scores: it mostly measures
  whether the model stored the fact, since each statement names the entity itself;
* ``world_heldout_greedy``: a greedy reply, right when it names the answer value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lmstack.eval._errors import DatasetError
from lmstack.eval.tasks._config import (
    ChatConfig,
    DatasetConfig,
    GenerationKwargs,
    MetricConfig,
    OutputType,
    TaskConfig,
)
from lmstack.eval.tasks._requests import Request
from lmstack.eval.tasks._task import Task
from lmstack.eval.tasks.builtin._base import BuiltinTask, Doc, data_root, read_jsonl

__all__ = ["WORLD_TASKS", "StatementsTask"]

HELDOUT = "heldout.jsonl"
CONTEXT_CHATS = "context_chats.jsonl"
_HELDOUT_KEYS = ("question", "answer", "choices", "label", "statements")


class StatementsTask(BuiltinTask):
    """Multiple choice where each choice is several alternative answer sentences (``statements``).

    A document sends one ``loglikelihood`` request per sentence, each carrying its choice's
    ``choice_index``; requests of one document that share a ``choice_index`` are alternative phrasings
    of that choice, and the choice's log-likelihood is the log-sum-exp of theirs (the probability that
    the reply is any of them), as the quickstart scores held-out questions.
    """

    def _doc_requests(
        self, doc_id: int, num_fewshot: int | None, chat: ChatConfig | bool | None
    ) -> list[Request]:
        context = self.context(doc_id, num_fewshot=num_fewshot, chat=chat)
        # In chat mode the sentence is the assistant's reply itself, as the quickstart scores it.
        delimiter = self.config.target_delimiter if isinstance(context, str) else ""
        return [
            Request(
                self.name, doc_id, "loglikelihood", context, continuation=delimiter + sentence, choice_index=j
            )
            for j, sentences in enumerate(self.docs[doc_id]["statements"])
            for sentence in sentences
        ]


def _world_rows(path: Path, keep: Callable[[Doc], Doc | None]) -> list[Doc]:
    docs = read_jsonl(path, keep, "bundled world")
    if not docs:
        raise DatasetError(f"{path} holds no rows this task asks about", path=path)
    return docs


def _heldout(kind: str) -> Callable[[Doc], Doc | None]:
    def keep(row: Doc) -> Doc | None:
        if row["kind"] != kind:
            return None
        missing = [key for key in _HELDOUT_KEYS if key not in row]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        return row

    return keep


def _context_chat(row: Doc) -> Doc:
    """A context chat as a document: its prompt (and system turn), and what a right reply names."""
    messages = row["messages"]
    meta = row["meta"]
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    reply = messages[-1]["content"]
    # A right refusal is the refusal sentence itself (its final period aside).
    answer = meta["answer"] if meta["answerable"] else reply.rstrip(".")
    return {
        "id": row["id"],
        "system": system,
        "prompt": prompt,
        "reply": reply,
        "answer": answer,
        "answerable": meta["answerable"],
        "attribute": meta["attribute"],
    }


@dataclass(frozen=True)
class _WorldTask:
    """How one world task reads its file and asks its documents (the table below)."""

    file: str
    keep: Callable[[Doc], Doc | None]
    output_type: OutputType
    metrics: tuple[MetricConfig, ...]
    doc_to_text: str = "question"
    doc_to_target: str = "answer"
    doc_to_choice: str | None = None
    description: str = ""
    max_gen_toks: int = 32
    task_class: type[BuiltinTask] = BuiltinTask

    def build(self, name: str, data_dir: str | os.PathLike[str] | None) -> Task:
        wants = f"the bundled world's {self.file} (examples/world/generate.py --out DIR)"
        root = data_root(name, data_dir, wants)
        path = root / self.file
        if not path.is_file():
            raise DatasetError(
                f"task {name!r}: {path} does not exist; generate the world into {root} with "
                f"`python examples/world/generate.py --out {root}`",
                path=path,
            )
        generates = self.output_type == "generate_until"
        config = TaskConfig(
            name=name,
            dataset=DatasetConfig(format="jsonl", data_files={"test": (path,)}),
            output_type=self.output_type,
            doc_to_text=self.doc_to_text,
            doc_to_target=self.doc_to_target,
            doc_to_choice=self.doc_to_choice,
            description=self.description,
            generation=GenerationKwargs(until=(), max_gen_toks=self.max_gen_toks) if generates else None,
            metrics=self.metrics,
            chat=ChatConfig(),
        )
        keep = self.keep
        return self.task_class(config, lambda split, file: _world_rows(file, keep))


_SPECS = {
    # Held-out facts: the answer value's log-likelihood after the question, against the other candidates.
    "world_heldout_mc": _WorldTask(
        HELDOUT,
        _heldout("fact"),
        "multiple_choice",
        (MetricConfig("acc"), MetricConfig("acc_norm")),
        doc_to_target="label",
        doc_to_choice="choices",
    ),
    # Held-out facts: each candidate as whole answer sentences (the quickstart's scoring).
    "world_heldout_statements": _WorldTask(
        HELDOUT,
        _heldout("fact"),
        "multiple_choice",
        (MetricConfig("acc"),),
        task_class=StatementsTask,
        doc_to_target="label",
        doc_to_choice="choices",
    ),
    # Held-out facts: a greedy reply of up to 32 tokens, right when it names the answer value.
    "world_heldout_greedy": _WorldTask(
        HELDOUT, _heldout("fact"), "generate_until", (MetricConfig("contains"),)
    ),
    # Held-out arithmetic (never in a training file): the last number of a greedy reply is the result.
    "world_arithmetic": _WorldTask(
        HELDOUT,
        _heldout("arithmetic"),
        "generate_until",
        (MetricConfig("exact_match", {"extract": "last_number"}),),
        max_gen_toks=24,
    ),
    # Answer from the context: name the value the excerpts state, or refuse when they do not.
    "world_context": _WorldTask(
        CONTEXT_CHATS,
        _context_chat,
        "generate_until",
        (MetricConfig("contains"),),
        doc_to_text="prompt",
        description="system",
        max_gen_toks=48,
    ),
}

WORLD_TASKS: dict[str, Callable[[str | os.PathLike[str] | None], Task]] = {
    name: partial(spec.build, name) for name, spec in _SPECS.items()
}
"""The world's tasks by name: each a function of ``data_dir``."""
