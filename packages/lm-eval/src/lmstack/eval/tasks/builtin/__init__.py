"""Built-in tasks: the bundled world, needle in a haystack, and standard benchmarks from local files.

:func:`find_task` builds one by name; every task reads local files from the ``data_dir`` it is given
(nothing is downloaded)::

    from lmstack.eval.tasks.builtin import find_task

    task = find_task("world_heldout_mc", data_dir="out/world")   # examples/world/generate.py --out out/world
    task = find_task("gsm8k", data_dir="data/gsm8k")              # test.jsonl, train.jsonl

========================== ==================================================================== =========
name                       what                                                                 data_dir
========================== ==================================================================== =========
world_heldout_mc           held-out facts: the answer value's log-likelihood after the question  world
world_heldout_statements   held-out facts: whole answer statements (the quickstart's scoring)    world
world_heldout_greedy       held-out facts: a greedy reply that names the value                   world
world_arithmetic           held-out arithmetic: the last number of a greedy reply                world
world_context              answer from the context, or refuse                                    world
mmlu                       MMLU, every subject (``test/``, ``dev/`` CSVs)                         release
ceval                      C-Eval validation (``val/``, ``dev/`` CSVs)                            release
gsm8k                      GSM8K, 5-shot, exact match after ``####``                              release
hellaswag                  HellaSwag validation                                                  release
arc_easy, arc_challenge    ARC (AI2's jsonl)                                                     release
humaneval, mbpp            code, pass@1 in lmstack-core's sandbox                                release
========================== ==================================================================== =========

The needle in a haystack needs the tested model's tokenizer, so it is built with :func:`needle_task`
rather than by name. Free-form replies are scored with the ``contains`` metric (a reply that names
the answer as whole words).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable

from lmstack.eval._errors import UnknownTaskError
from lmstack.eval.tasks._task import Task
from lmstack.eval.tasks.builtin._base import BuiltinTask
from lmstack.eval.tasks.builtin._code import CODE_TASKS
from lmstack.eval.tasks.builtin._formats import FORMAT_TASKS, hellaswag_preprocess
from lmstack.eval.tasks.builtin._needle import (
    DEFAULT_NEEDLES,
    Needle,
    NeedleGrid,
    NeedleTask,
    needle_grid,
    needle_task,
    read_haystack,
)
from lmstack.eval.tasks.builtin._world import WORLD_TASKS, StatementsTask

__all__ = [
    "DEFAULT_NEEDLES",
    "BuiltinTask",
    "Needle",
    "NeedleGrid",
    "NeedleTask",
    "StatementsTask",
    "builtin_task_names",
    "find_task",
    "hellaswag_preprocess",
    "needle_grid",
    "needle_task",
    "read_haystack",
]


_TASKS: dict[str, Callable[[str | os.PathLike[str] | None], Task]] = {
    **WORLD_TASKS,
    **FORMAT_TASKS,
    **CODE_TASKS,
}


def builtin_task_names() -> list[str]:
    """The names :func:`find_task` knows, sorted."""
    return sorted(_TASKS)


def find_task(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Task:
    """A built-in task by name, reading its documents from ``data_dir``.

    Args:
        name: One of :func:`builtin_task_names`.
        data_dir: The folder holding the task's files: the bundled world's output folder for the
            ``world_*`` tasks, the benchmark's released files for the others.

    Raises:
        UnknownTaskError: No built-in task has that name (the message lists them, and the closest).
        TaskConfigError: ``data_dir`` is missing.
        DatasetError: ``data_dir`` lacks the file the task reads (the message names it).
    """
    factory = _TASKS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, _TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(
            f"no built-in task {name!r}{hint}; the built-in tasks are {', '.join(builtin_task_names())} "
            "(or pass a task YAML file)"
        )
    return factory(data_dir)
