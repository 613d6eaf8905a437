"""Which tasks a run evaluates: task files, group files, built-in task names, or :class:`Task` objects.

A group file (lm-evaluation-harness's ``group:`` YAML) adds its member tasks to the run and a
:class:`TaskGroup` that scoring averages over them; a task that two groups share runs once.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.eval._errors import TaskConfigError, UnknownTaskError
from lmstack.eval.tasks import GroupConfig, GroupMetric, Task, TaskConfig, load_task, load_task_file

__all__ = ["TaskGroup", "TaskSpec", "resolve_run", "resolve_tasks"]

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


@dataclass(frozen=True)
class TaskGroup:
    """A group of a run: its members' names and the metrics averaged over them.

    Attributes:
        name: The group's name.
        members: Names of its member tasks and subgroups, in the file's order.
        aggregate: The averaged metrics.
        alias: Its display name.
    """

    name: str
    members: tuple[str, ...]
    aggregate: tuple[GroupMetric, ...]
    alias: str


class _Run:
    """Tasks and groups as they are met, each task kept once (a shared member runs once)."""

    def __init__(self, data_dir: str | Path | None) -> None:
        self.data_dir = data_dir
        self.tasks: dict[str, Task] = {}
        self.groups: dict[str, TaskGroup] = {}

    def add_task(self, task: Task, *, shared: bool) -> str:
        known = self.tasks.get(task.name)
        if known is None:
            self.tasks[task.name] = task
        elif not shared or known.config != task.config:
            # Results are keyed by name: two definitions (or one given twice) would collide.
            raise TaskConfigError(
                f"task {task.name!r} is given twice; each task's results are keyed by its name"
            )
        return task.name

    def add(self, item: Task | TaskConfig | GroupConfig | str, *, shared: bool) -> str:
        if isinstance(item, GroupConfig):
            return self.add_group(item)
        if isinstance(item, str):
            return self.add_task(_builtin(item, self.data_dir), shared=shared)
        return self.add_task(item if isinstance(item, Task) else Task(item), shared=shared)

    def add_group(self, group: GroupConfig) -> str:
        if group.name in self.groups or group.name in self.tasks:
            raise TaskConfigError(f"group {group.name!r} is given twice, or shares a task's name")
        members = tuple(self.add(member, shared=True) for member in group.members)
        # Members first: a group's score is computed after its subgroups'.
        self.groups[group.name] = TaskGroup(group.name, members, group.aggregate, group.alias or group.name)
        return group.name

    def add_spec(self, spec: TaskSpec) -> None:
        if isinstance(spec, (Task, TaskConfig)):
            self.add(spec, shared=False)
            return
        path = Path(spec)
        if path.suffix in _TASK_FILE_SUFFIXES or path.is_file():
            if not path.is_file():
                raise UnknownTaskError(f"task file {path} does not exist")
            self.add(load_task_file(path), shared=False)
        else:
            self.add(str(spec), shared=False)


def _flatten(specs: TaskSpec | Sequence[TaskSpec]) -> list[TaskSpec]:
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
    return flat


def resolve_run(
    specs: TaskSpec | Sequence[TaskSpec], *, data_dir: str | Path | None = None
) -> tuple[list[Task], list[TaskGroup]]:
    """Load each task or group: a :class:`Task`, :class:`TaskConfig`, task or group file, or built-in name.

    A string ending in ``.yaml``/``.yml`` or naming an existing file is a task (or group) file; any
    other string is a built-in task name, looked up by ``lmstack.eval.tasks.builtin.find_task``. A
    comma-separated string is several.

    Returns:
        The tasks to run (a group's members included, each once) and the groups, every group after
        its subgroups.

    Raises:
        UnknownTaskError: A name that is neither a file nor a built-in task.
        TaskConfigError: Two different tasks share a name, or a task is given twice (their results
            would collide).
    """
    run = _Run(data_dir)
    for spec in _flatten(specs):
        run.add_spec(spec)
    return list(run.tasks.values()), list(run.groups.values())


def resolve_tasks(specs: TaskSpec | Sequence[TaskSpec], *, data_dir: str | Path | None = None) -> list[Task]:
    """The tasks of :func:`resolve_run` (a group file gives its member tasks)."""
    return resolve_run(specs, data_dir=data_dir)[0]
