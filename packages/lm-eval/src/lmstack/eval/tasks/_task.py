"""A task: its documents, their prompts (with few-shot examples) and the requests and targets built from them.

Prompts are built exactly as lm-evaluation-harness builds them (``ConfigurableTask.fewshot_context``):
the description, then each few-shot example as ``text + target_delimiter + answer + fewshot_delimiter``,
then the document's text; in chat-template mode the same pieces become system/user/assistant turns.
The one deliberate difference is the few-shot sampler: lm-eval draws every document's examples from
one generator shared by the whole run, so a document's examples depend on which documents came before
it (batch, rank, ``--limit``). Here each document's generator is seeded from the task seed and its doc
id alone, and then draws exactly as lm-eval's sampler does.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from lmstack.eval._errors import DatasetError, TaskConfigError, TemplateError
from lmstack.eval.tasks._config import ChatConfig, TaskConfig
from lmstack.eval.tasks._data import Doc, read_split
from lmstack.eval.tasks._requests import ChatMessage, DocTarget, Request, prompt_hash
from lmstack.eval.tasks._templates import DocRenderer
from lmstack.eval.tasks._yaml import load_task_config

__all__ = ["Task", "fewshot_seed", "load_task"]


def fewshot_seed(task_seed: int, doc_id: int) -> int:
    """The seed of one document's few-shot sampler: a function of the task seed and doc id only."""
    digest = hashlib.sha256(f"lmstack-fewshot:{task_seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _join(prefix: str | None, suffix: str | None, delimiter: str) -> str:
    """Join two prompt parts, adding ``delimiter`` only where neither brings whitespace (lm-eval's rule)."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    if prefix[-1].isspace() or suffix[0].isspace():
        return prefix + suffix
    return prefix + delimiter + suffix


class _Turn:
    """A prompt piece: a role, its text, and what follows it when everything is flattened to text."""

    __slots__ = ("after", "content", "role")

    def __init__(self, role: str, content: str, after: str = "") -> None:
        self.role = role
        self.content = content
        self.after = after


def load_task(task: TaskConfig | str | Path) -> Task:
    """A :class:`Task` from a config, or from a task file (lmstack's format or lm-eval task YAML)."""
    return Task(task if isinstance(task, TaskConfig) else load_task_config(task))


class Task:
    """One evaluation task, ready to turn its documents into requests.

    Documents are read lazily, on first use, and kept.

    Args:
        config: The task definition.
    """

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        """The task's name."""
        return self.config.name

    def __repr__(self) -> str:
        return f"Task({self.config.name!r}, output_type={self.config.output_type!r})"

    # ---------------------------------------------------------------- documents

    @cached_property
    def docs(self) -> list[Doc]:
        """The evaluated split's documents; a document's id is its index here."""
        docs = self._read(self.config.splits.eval_split)
        if not docs:
            raise DatasetError(f"task {self.name}: split {self.config.splits.eval_split!r} has no documents")
        return docs

    @cached_property
    def fewshot_docs(self) -> list[Doc]:
        """The documents few-shot examples are drawn from."""
        split = self.config.splits.fewshot_split
        return self.docs if split == self.config.splits.eval_split else self._read(split)

    def _read(self, split: str) -> list[Doc]:
        try:
            return read_split(self.config.dataset, split)
        except DatasetError as err:
            source = f" (task file {self.config.source})" if self.config.source else ""
            raise type(err)(f"task {self.name}{source}: {err}", path=err.path, line=err.line) from err

    @cached_property
    def _renderer(self) -> DocRenderer:
        # lm-eval decides "field name or template" by the evaluated split's columns.
        features: dict[str, None] = {}
        for doc in self.docs:
            features.update(dict.fromkeys(doc))
        return DocRenderer(features, has_choices=self.config.doc_to_choice is not None)

    def select(self, *, limit: int | None = None, doc_ids: Iterable[int] | None = None) -> list[int]:
        """The ids of the documents evaluated: ``doc_ids`` if given, else the first ``limit`` (or all)."""
        count = len(self.docs)
        if doc_ids is not None:
            ids = list(doc_ids)
            for doc_id in ids:
                if not 0 <= doc_id < count:
                    raise TaskConfigError(
                        f"task {self.name}: doc id {doc_id} is out of range (0..{count - 1})"
                    )
            return ids
        limit = self.config.limit if limit is None else limit
        return list(range(count if limit is None else min(limit, count)))

    # ---------------------------------------------------------------- few-shot

    def fewshot_examples(self, doc_id: int, num_fewshot: int | None = None) -> list[Doc]:
        """The few-shot examples of one document: the same whatever else is evaluated with it.

        The document itself is never among them when examples come from the evaluated split.
        """
        n = self.config.num_fewshot if num_fewshot is None else num_fewshot
        if n <= 0 or self.config.output_type == "loglikelihood_rolling":
            return []
        doc = self.docs[doc_id]
        pool = self.fewshot_docs
        exclude = self.config.splits.fewshot_split == self.config.splits.eval_split
        split = self.config.splits.fewshot_split
        if self.config.fewshot_sampler == "first_n":
            candidates = [x for x in pool if x != doc] if exclude else pool
            if len(candidates) < n:
                raise TaskConfigError(
                    f"task {self.name}: num_fewshot={n} but split {split!r} has only "
                    f"{len(candidates)} examples"
                )
            return list(candidates[:n])
        # The draw of lm-eval's ContextSampler.sample, from this document's own generator.
        needed = n + 1 if exclude else n
        if len(pool) < needed:
            raise TaskConfigError(
                f"task {self.name}: num_fewshot={n} needs {needed} documents in split {split!r}, "
                f"which has {len(pool)}"
            )
        rng = random.Random(fewshot_seed(self.config.seed, doc_id))
        if not exclude:
            return rng.sample(pool, n)
        examples = [x for x in rng.sample(pool, n + 1) if x != doc][:n]
        if len(examples) < n:
            # Copies of this document were drawn and removed: draw again without any copy.
            others = [x for x in pool if x != doc]
            if len(others) < n:
                raise TaskConfigError(
                    f"task {self.name}: too few few-shot examples in {split!r} besides doc {doc_id}"
                )
            examples = rng.sample(others, n)
        return examples

    # ---------------------------------------------------------------- prompts

    def _choices(self, doc: Mapping[str, Any], doc_id: int | None) -> list[str] | None:
        spec = self.config.doc_to_choice
        return None if spec is None else self._renderer.choices(spec, doc, doc_id=doc_id)

    def _text(self, doc: Mapping[str, Any], doc_id: int | None) -> str:
        assert self.config.doc_to_text is not None  # TaskConfig requires it for prompting output types
        text = self._renderer.text(self.config.doc_to_text, doc, doc_id=doc_id)
        if not isinstance(text, str):
            raise TemplateError(
                f"task {self.name}: doc_to_text gave {text!r} for doc {doc_id}, not a string "
                "(lm-eval's multiple-input tasks, where it is a choice index, are not supported)",
                field=None,
                template=self.config.doc_to_text,
                doc_id=doc_id,
            )
        return text

    def _target(self, doc: Mapping[str, Any], doc_id: int | None) -> Any:
        assert self.config.doc_to_target is not None  # TaskConfig requires it
        return self._renderer.target(self.config.doc_to_target, doc, doc_id=doc_id)

    def _answer_text(self, answer: Any, choices: list[str] | None, doc_id: int | None) -> str:
        """A target as the text a few-shot example shows (an index picks a choice; a list, its first)."""
        if isinstance(answer, list):
            if not answer:
                raise self._target_error(
                    f"task {self.name}: doc_to_target gave an empty list for doc {doc_id}", doc_id
                )
            answer = answer[0]
        if isinstance(answer, int) and not isinstance(answer, bool) and choices is not None:
            if not 0 <= answer < len(choices):
                raise self._target_error(
                    f"task {self.name}: target index {answer} of doc {doc_id} is out of range for its "
                    f"{len(choices)} choices",
                    doc_id,
                )
            return choices[answer]
        return str(answer)

    def _turns(self, doc_id: int, num_fewshot: int | None, chat: ChatConfig | None) -> list[_Turn]:
        config = self.config
        doc = self.docs[doc_id]
        turns: list[_Turn] = []
        description = self._renderer.field_or_template(
            config.description, doc, doc_id=doc_id, what="description"
        )
        system = _join(chat.system_prompt if chat else None, description, config.fewshot_delimiter)
        if system:
            turns.append(_Turn("system", system))
        question = self._text(doc, doc_id)  # first, so that a bad template names this doc
        for example in self.fewshot_examples(doc_id, num_fewshot):
            example_text = self._text(example, None)
            answer = self._target(example, None)
            has_answer = answer is not None and answer != ""
            turns.append(_Turn("user", example_text, config.target_delimiter if has_answer else ""))
            if has_answer:
                answer_text = self._answer_text(answer, self._choices(example, None), None)
                turns.append(_Turn("assistant", answer_text, config.fewshot_delimiter))
        turns.append(_Turn("user", question))
        return turns

    def context(
        self, doc_id: int, *, num_fewshot: int | None = None, chat: ChatConfig | bool | None = True
    ) -> str | tuple[ChatMessage, ...]:
        """One document's prompt: text, or chat messages in chat-template mode.

        Args:
            doc_id: The document's index in the evaluated split.
            num_fewshot: Overrides the task's ``num_fewshot``.
            chat: ``True`` follows the task config; ``False``/``None`` forces plain text; a
                :class:`ChatConfig` forces chat-template mode with it.
        """
        chat_config = self.config.chat if chat is True else (chat or None)
        assert not isinstance(chat_config, bool)
        turns = self._turns(doc_id, num_fewshot, chat_config)
        if chat_config is None:
            return "".join(turn.content + turn.after for turn in turns)
        if chat_config.fewshot_as_multiturn:
            return tuple(ChatMessage(turn.role, turn.content) for turn in turns)
        # One user message holding the few-shot examples and the question (lm-eval without multiturn).
        system = [ChatMessage("system", turns[0].content)] if turns[0].role == "system" else []
        body = turns[len(system) :]
        return (*system, ChatMessage("user", "".join(turn.content + turn.after for turn in body)))

    # ---------------------------------------------------------------- requests and targets

    def build_requests(
        self,
        *,
        limit: int | None = None,
        num_fewshot: int | None = None,
        doc_ids: Iterable[int] | None = None,
        chat: ChatConfig | bool | None = True,
    ) -> list[Request]:
        """The requests of the selected documents, in doc order (choices in order within a document).

        Args:
            limit: Evaluate the first ``limit`` documents (overrides the config's ``limit``).
            num_fewshot: Overrides the task's ``num_fewshot``.
            doc_ids: Evaluate exactly these documents instead.
            chat: As in :meth:`context`.
        """
        requests: list[Request] = []
        for doc_id in self.select(limit=limit, doc_ids=doc_ids):
            requests.extend(self._doc_requests(doc_id, num_fewshot, chat))
        return requests

    def _doc_requests(
        self, doc_id: int, num_fewshot: int | None, chat: ChatConfig | bool | None
    ) -> list[Request]:
        config = self.config
        doc = self.docs[doc_id]
        if config.output_type == "loglikelihood_rolling":
            text = self._target(doc, doc_id)
            return [Request(self.name, doc_id, "loglikelihood_rolling", str(text))]
        context = self.context(doc_id, num_fewshot=num_fewshot, chat=chat)
        if config.output_type == "generate_until":
            return [Request(self.name, doc_id, "generate_until", context, generation=config.generation)]
        if config.output_type == "loglikelihood":
            return [
                Request(
                    self.name, doc_id, "loglikelihood", context, continuation=str(self._target(doc, doc_id))
                )
            ]
        choices = self._choices(doc, doc_id)
        assert choices is not None  # multiple_choice requires doc_to_choice
        # In chat mode the choice follows the assistant's turn directly (lm-eval without gen_prefix).
        delimiter = config.target_delimiter if isinstance(context, str) else ""
        return [
            Request(
                self.name, doc_id, "loglikelihood", context, continuation=delimiter + choice, choice_index=i
            )
            for i, choice in enumerate(choices)
        ]

    def targets(self, *, limit: int | None = None, doc_ids: Iterable[int] | None = None) -> list[DocTarget]:
        """What each selected document is scored against, in doc order."""
        return [self.target(doc_id) for doc_id in self.select(limit=limit, doc_ids=doc_ids)]

    def target(self, doc_id: int) -> DocTarget:
        """What one document is scored against."""
        doc = self.docs[doc_id]
        answer = self._target(doc, doc_id)
        choices = self._choices(doc, doc_id)
        if choices is None:
            if isinstance(answer, list):
                return DocTarget(doc_id, tuple(str(a) for a in answer))
            return DocTarget(doc_id, str(answer))
        golds = [self._gold(a, choices, doc_id) for a in (answer if isinstance(answer, list) else [answer])]
        texts = tuple(choices[g] for g in golds)
        if isinstance(answer, list):
            return DocTarget(doc_id, texts, tuple(golds), tuple(choices))
        return DocTarget(doc_id, texts[0], golds[0], tuple(choices))

    def _target_error(self, message: str, doc_id: int | None) -> TemplateError:
        return TemplateError(message, field=None, template=str(self.config.doc_to_target), doc_id=doc_id)

    def _gold(self, answer: Any, choices: Sequence[str], doc_id: int) -> int:
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            return answer
        if isinstance(answer, str) and answer in choices:
            return choices.index(answer)
        raise self._target_error(
            f"task {self.name}: doc {doc_id}'s target {answer!r} is neither an index into nor one of its "
            f"choices {list(choices)!r}",
            doc_id,
        )

    def program(self, doc_id: int, completion: str) -> str:
        """The program that tests one completion: ``code.program`` rendered with the doc and ``completion``.

        Raises:
            TaskConfigError: The task has no ``code`` section.
            TemplateError: The template names a field the document lacks.
        """
        code = self.config.code
        if code is None:
            raise TaskConfigError(f"task {self.name} has no `code` section: nothing runs its completions")
        fields = {**self.docs[doc_id], "completion": completion}
        return self._renderer.render(code.program, fields, doc_id=doc_id, what="code.program")

    def prompt_hash(self, requests: Sequence[Request] | None = None) -> str:
        """sha256 over ``requests`` (by default all of :meth:`build_requests`'s), in order."""
        return prompt_hash(self.build_requests() if requests is None else requests)
