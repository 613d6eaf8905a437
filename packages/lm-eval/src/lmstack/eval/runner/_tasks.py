"""Which tasks a run evaluates: task files, built-in task names, or :class:`Task` objects."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmstack.eval._errors import TaskConfigError, UnknownTaskError
from lmstack.eval.tasks import Task, TaskConfig, load_task

__all__ = ["TaskSpec", "resolve_tasks"]

TaskSpec = Task | TaskConfig | str | Path
_TASK_FILE_SUFFIXES = (".yaml", ".yml")


def _builtin(name: str, data_dir: str | Path | None) -> Task:
    try:
        builtin: Any = importlib.import_module("lmstack.eval.tasks.builtin")
        find_task = builtin.find_task
    except (ImportError, AttributeError) as err:
        raise UnknownTaskError(
            f"unknown task {name!r}: it is not a task file and this lmstack-eval has no built-in tasks "
            f"({err}); pass the path of a task YAML file"
        ) from err
    found = find_task(name, data_dir=data_dir)
    return found if isinstance(found, Task) else load_task(found)


def _one(spec: TaskSpec, data_dir: str | Path | None) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, TaskConfig):
        return Task(spec)
    path = Path(spec)
    if path.suffix in _TASK_FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise UnknownTaskError(f"task file {path} does not exist")
        return load_task(path)
    return _builtin(str(spec), data_dir)


def resolve_tasks(specs: TaskSpec | Sequence[TaskSpec], *, data_dir: str | Path | None = None) -> list[Task]:
    """Load each task: a :class:`Task`, a :class:`TaskConfig`, a task file path or a built-in name.

    A string ending in ``.yaml``/``.yml`` or naming an existing file is a task file; any other string
    is a built-in task name, looked up by ``lmstack.eval.tasks.builtin.find_task``. A comma-separated
    string is several tasks.

    Raises:
        UnknownTaskError: A name that is neither a file nor a built-in task.
        TaskConfigError: Two tasks share a name (their results would collide).
    """
    if isinstance(specs, (str, Path, Task, TaskConfig)):
        specs = [specs]
    flat: list[TaskSpec] = []
    for spec in specs:
        if isinstance(spec, str) and "," in spec:
            flat.extend(part.strip() for part in spec.split(",") if part.strip())
        else:
            flat.append(spec)
    if not flat:
        raise UnknownTaskError("no task given: name at least one task or task file")
    tasks = [_one(spec, data_dir) for spec in flat]
    names = [task.name for task in tasks]
    for name in names:
        if names.count(name) > 1:
            raise TaskConfigError(f"task {name!r} is given twice; each task's results are keyed by its name")
    return tasks
