"""Task files: lmstack's own YAML format and lm-evaluation-harness task YAML (its common subset).

A file with a top-level ``task`` key is read as an lm-eval task; one with ``name`` as lmstack's own;
one with ``group`` as an lm-eval group. lm-eval keys outside the supported subset (``!function``,
``filter_list``, ``process_docs``, ...) are errors that name the key and the file: lmstack never runs
Python named by a task file.

``include`` works as in lm-eval: the named YAML file (or files, in order; relative to the including
file's directory) is read first and the including file's keys replace its top-level keys, so MMLU's
``_default_template_yaml`` plus one small file per subject reads as it does there. An include cycle is
an error. Relative data files resolve against the directory of the file that gave ``dataset_kwargs``.

A group's ``task`` list names task files (relative paths), tasks, tags or other groups defined by the
YAML files in and under the group file's directory, inline task mappings, or built-in task names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmstack.eval._errors import TaskConfigError
from lmstack.eval.tasks._config import (
    DATASET_FORMATS,
    DatasetConfig,
    GenerationKwargs,
    GroupConfig,
    GroupMetric,
    SplitConfig,
    TaskConfig,
    _expect,
    _Where,
    parse_choice_spec,
    parse_metrics,
    resolve_data_files,
)

__all__ = ["from_lm_eval_dict", "load_task_config", "load_task_file"]

# The lm-eval keys read here; the rest of lm-eval's TaskConfig is refused by name.
_LM_EVAL_KEYS = (
    "task",
    "task_alias",
    "tag",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "fewshot_config",
    "num_fewshot",
    "output_type",
    "generation_kwargs",
    "metric_list",
    "metadata",
    "repeats",
    "should_decontaminate",
)
# lm-eval's sampler names -> lmstack's.
_SAMPLERS = {"default": "random", "first_n": "first_n"}


class _FunctionTag:
    """A ``!function`` value, kept only to be refused with the key it sits under."""

    def __init__(self, target: str) -> None:
        self.target = target


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's ``!function`` tag, which loads as a marker instead of importing code."""


_TaskLoader.add_constructor(
    "!function",
    lambda loader, node: _FunctionTag(str(loader.construct_scalar(node))),  # type: ignore[arg-type]
)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TaskConfigError(f"cannot read task file {path}: {err}", source=path) from err
    try:
        data = yaml.load(text, Loader=_TaskLoader)
    except yaml.YAMLError as err:
        raise TaskConfigError(f"task file {path} is not valid YAML: {err}", source=path) from err
    if not isinstance(data, Mapping):
        raise TaskConfigError(
            f"task file {path} must hold a mapping of task keys, not {type(data).__name__}", source=path
        )
    return data


def _refuse_functions(where: _Where, data: Any, key: str) -> None:
    """Raise on any ``!function`` value, naming its (dotted) key."""
    if isinstance(data, _FunctionTag):
        raise where.error(
            key, f"uses !function {data.target}; lmstack does not run Python code from task files"
        )
    if isinstance(data, Mapping):
        for name, value in data.items():
            _refuse_functions(where, value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _refuse_functions(where, value, f"{key}[{i}]")


@dataclass
class _Raw:
    """A task file's mapping with its includes merged in, and which file gave each top-level key."""

    path: Path
    data: dict[str, Any]
    origin: dict[str, Path]

    def base_dir(self, key: str) -> Path:
        """The directory relative paths under ``key`` resolve against."""
        return self.origin.get(key, self.path).parent


def _read_raw(path: Path, chain: tuple[Path, ...] = ()) -> _Raw:
    """Read a file and, first, the files it includes (lm-eval's ``include``: its own keys win)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise TaskConfigError(f"task file {chain[-1]}: include cycle {cycle}", key="include", source=path)
    data = dict(_read_yaml(path))
    include = data.pop("include", None)
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    if include is not None:
        where = _Where(path)
        names = [include] if isinstance(include, str) else include
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise where.error("include", f"expected a file name or a list of them, got {include!r}")
        # In list order, a later file's keys replacing an earlier one's (lm-eval's load_yaml).
        for name in names:
            target = Path(name) if Path(name).is_absolute() else path.parent / name
            if not target.is_file():
                raise where.error("include", f"names {name!r}, but {target} is not a file")
            sub = _read_raw(target, (*chain, resolved))
            merged.update(sub.data)
            origin.update(sub.origin)
    merged.update(data)
    origin.update(dict.fromkeys(data, path))
    return _Raw(path, merged, origin)


def load_task_config(path: str | Path) -> TaskConfig:
    """Read a task file in lmstack's own format or as an lm-evaluation-harness task YAML.

    Relative data files resolve against the directory of the file that names them.

    Raises:
        TaskConfigError: The file is unreadable, not YAML, a group, or has an unknown or unsupported
            key (the message names the key and the file).
    """
    config = load_task_file(path)
    if isinstance(config, GroupConfig):
        raise TaskConfigError(
            f"{path} defines the group {config.name}, not a task: evaluate it as a task list "
            "(lmstack.eval.evaluate and lmstack eval --tasks read group files)",
            key="group",
            source=Path(path),
        )
    return config


def load_task_file(path: str | Path) -> TaskConfig | GroupConfig:
    """Read a task file (lmstack's format, an lm-eval task YAML) or an lm-eval group YAML.

    Raises:
        TaskConfigError: As :func:`load_task_config`, plus a group member that cannot be found, a group
            that contains itself, or an include cycle.
    """
    return _from_raw(_read_raw(Path(path)), ())


def _from_raw(raw: _Raw, groups: tuple[Path, ...]) -> TaskConfig | GroupConfig:
    path, data = raw.path, raw.data
    where = _Where(path)
    _refuse_functions(where, data, "")
    if "group" in data and "task" in data and isinstance(data["task"], list):
        return _group(raw, groups)
    if "task" in data and "name" in data:
        raise where.error(
            "name", "a task file has either `task` (lm-evaluation-harness) or `name` (lmstack), not both"
        )
    if "task" in data:
        return from_lm_eval_dict(data, source=path, base_dir=raw.base_dir("dataset_kwargs"))
    if "name" in data:
        return TaskConfig.from_dict(data, source=path, base_dir=raw.base_dir("dataset"))
    if "group" in data:
        raise where.error("task", "a group file needs `task`: the list of its tasks")
    raise TaskConfigError(
        f"task file {path} has neither `name` (lmstack's format), `task` (lm-evaluation-harness's) "
        "nor `group` (an lm-evaluation-harness group)",
        source=path,
    )


# ---------------------------------------------------------------- groups

_GROUP_KEYS = ("group", "group_alias", "task", "aggregate_metric_list", "metadata")
_AGGREGATE_KEYS = ("metric", "aggregation", "weight_by_size", "filter_list")
_YAML_SUFFIXES = (".yaml", ".yml")


def _index(root: Path) -> dict[str, list[_Raw]]:
    """Every task, tag and group name defined by the YAML files in and under ``root``, -> its files."""
    found: dict[str, list[_Raw]] = {}
    for file in sorted(p for p in root.rglob("*") if p.suffix in _YAML_SUFFIXES and p.is_file()):
        try:
            raw = _read_raw(file)
        except TaskConfigError:
            continue  # not a task file (or a broken one): only an error if a group needs it
        data = raw.data
        names = [data.get("group") if isinstance(data.get("task"), list) else data.get("task")]
        tags = data.get("tag")
        names += [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []
        for name in names:
            if isinstance(name, str):
                found.setdefault(name, []).append(raw)
    return found


def _group(raw: _Raw, groups: tuple[Path, ...]) -> GroupConfig:
    path, data = raw.path, raw.data
    where = _Where(path)
    resolved = path.resolve()
    if resolved in groups:
        raise where.error("task", f"group {data['group']} contains itself")
    where.check_keys(data, _GROUP_KEYS, "group")
    name = _expect(where, "group", data["group"], str, "the group's name as a string")
    index: dict[str, list[_Raw]] | None = None
    members: list[TaskConfig | GroupConfig | str] = []
    for i, entry in enumerate(data["task"]):
        if isinstance(entry, Mapping):
            # An inline lm-eval task: its keys over those of the task it names, if a file defines it.
            index = _index(path.parent) if index is None else index
            base = next((r for r in index.get(str(entry.get("task")), []) if "task" in r.data), None)
            inline = _Raw(path, {**(base.data if base else {}), **entry},
                          {**(base.origin if base else {}), **dict.fromkeys(entry, path)})  # fmt: skip
            members.append(_from_raw(inline, (*groups, resolved)))
            continue
        if not isinstance(entry, str):
            raise where.error(f"task[{i}]", f"expected a task name, a file or a mapping, got {entry!r}")
        file = path.parent / entry
        if file.suffix in _YAML_SUFFIXES and file.is_file():
            members.append(_from_raw(_read_raw(file), (*groups, resolved)))
            continue
        index = _index(path.parent) if index is None else index
        matches = index.get(entry, [])
        if not matches:
            members.append(entry)  # a built-in task, resolved by the runner
        members.extend(_from_raw(match, (*groups, resolved)) for match in matches)
    aggregate = _expect(
        where, "aggregate_metric_list", data.get("aggregate_metric_list") or [], list, "a list"
    )
    return GroupConfig(
        name=name,
        members=tuple(members),
        aggregate=tuple(
            _aggregate(where.child(f"aggregate_metric_list[{i}]"), a) for i, a in enumerate(aggregate)
        ),
        alias=_expect(where, "group_alias", data.get("group_alias") or name, str, "a string"),
        source=path,
    )


def _aggregate(where: _Where, entry: Any) -> GroupMetric:
    entry = _expect(where, "metric", entry, Mapping, "a mapping with `metric`")
    where.check_keys(entry, _AGGREGATE_KEYS, "aggregate_metric_list")
    metric = _expect(where, "metric", entry.get("metric"), str, "a metric name")
    if entry.get("aggregation", "mean") != "mean":
        raise where.error("aggregation", f"only mean is supported, got {entry['aggregation']!r}")
    filters = entry.get("filter_list", "none")
    if filters not in ("none", ["none"]):
        raise where.error("filter_list", f"filters are not supported, got {filters!r}")
    weight = _expect(where, "weight_by_size", entry.get("weight_by_size", False), bool, "true or false")
    return GroupMetric(metric, weight)


# ---------------------------------------------------------------- lm-eval tasks


def from_lm_eval_dict(
    data: Mapping[str, Any], *, source: str | Path | None = None, base_dir: Path | None = None
) -> TaskConfig:
    """Translate an lm-evaluation-harness task mapping (the supported subset) to a :class:`TaskConfig`.

    Relative ``dataset_kwargs.data_files`` resolve against ``base_dir`` when given, else the directory
    of ``source`` when given.
    """
    path = None if source is None else Path(source)
    if base_dir is None and path is not None:
        base_dir = path.parent
    where = _Where(path)
    _refuse_functions(where, data, "")
    for key in data:
        if key not in _LM_EVAL_KEYS:
            raise where.error(
                str(key),
                "is an lm-evaluation-harness key that lmstack does not support; the supported ones are "
                + ", ".join(_LM_EVAL_KEYS),
            )
    repeats = _expect(where, "repeats", data.get("repeats", 1), int, "an int")
    if data.get("should_decontaminate", False):
        raise where.error("should_decontaminate", "decontamination is not supported")
    if not isinstance(data.get("task"), str):
        raise where.error("task", f"expected the task's name as a string, got {data.get('task')!r}")

    fewshot_delimiter = _expect(
        where, "fewshot_delimiter", data.get("fewshot_delimiter", "\n\n"), str, "a string"
    )
    output_type = data.get("output_type", "generate_until")
    kwargs = _expect(where, "generation_kwargs", data.get("generation_kwargs") or {}, Mapping, "a mapping")
    generation: GenerationKwargs | None = GenerationKwargs.from_dict(
        kwargs, default_until=fewshot_delimiter, where=where.child("generation_kwargs")
    )
    if output_type != "generate_until":
        generation = None  # checked, then ignored, as lm-eval ignores it for other output types
    sampler, fewshot_split = _fewshot_config(where, data)
    num_fewshot = data.get("num_fewshot")
    return TaskConfig(
        name=data["task"],
        dataset=_dataset(where, data, base_dir=base_dir),
        output_type=output_type,
        doc_to_text=_template(where, data, "doc_to_text"),
        doc_to_target=_template(where, data, "doc_to_target"),
        doc_to_choice=parse_choice_spec(where, "doc_to_choice", data.get("doc_to_choice")),
        splits=SplitConfig(
            test=_split(where, data, "test_split"),
            validation=_split(where, data, "validation_split"),
            train=_split(where, data, "training_split"),
            fewshot=fewshot_split,
        ),
        description=_expect(where, "description", data.get("description") or "", str, "a string"),
        target_delimiter=_expect(
            where, "target_delimiter", data.get("target_delimiter", " "), str, "a string"
        ),
        fewshot_delimiter=fewshot_delimiter,
        num_fewshot=0 if num_fewshot is None else _expect(where, "num_fewshot", num_fewshot, int, "an int"),
        fewshot_sampler=sampler,
        generation=generation,
        metrics=parse_metrics(where, "metric_list", data.get("metric_list") or (), name_key="metric"),
        chat=None,
        repeats=repeats,
        source=path,
    )


def _template(where: _Where, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        # lm-eval allows a constant index (doc_to_target: 0); as a template it renders the same digits.
        return str(value)
    return None if value is None else _expect(where, key, value, str, "a field name or a jinja2 template")


def _split(where: _Where, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else _expect(where, key, value, str, "a split name")


def _dataset(where: _Where, data: Mapping[str, Any], *, base_dir: Path | None) -> DatasetConfig:
    dataset_path = data.get("dataset_path")
    if not isinstance(dataset_path, str):
        raise where.error(
            "dataset_path", f"expected json, csv, parquet or a datasets name, got {dataset_path!r}"
        )
    kwargs = _expect(where, "dataset_kwargs", data.get("dataset_kwargs") or {}, Mapping, "a mapping")
    kwargs_where = where.child("dataset_kwargs")
    kwargs_where.check_keys(kwargs, ("data_files",), "dataset_kwargs")
    files = resolve_data_files(
        kwargs.get("data_files"), base_dir=base_dir, where=kwargs_where, key="data_files"
    )
    # lm-eval hands dataset_path to datasets.load_dataset: json/csv/parquet are its local-file builders.
    if dataset_path in DATASET_FORMATS and dataset_path not in ("hf", "jsonl"):
        if data.get("dataset_name") is not None:
            raise where.error("dataset_name", f"has no meaning for dataset_path: {dataset_path}")
        return DatasetConfig(format=dataset_path, data_files=files)  # type: ignore[arg-type]
    return DatasetConfig(format="hf", data_files=files, path=dataset_path, name=data.get("dataset_name"))


def _fewshot_config(where: _Where, data: Mapping[str, Any]) -> tuple[Any, str | None]:
    fewshot_split = _split(where, data, "fewshot_split")
    config = _expect(where, "fewshot_config", data.get("fewshot_config") or {}, Mapping, "a mapping")
    config_where = where.child("fewshot_config")
    config_where.check_keys(config, ("sampler", "split"), "fewshot_config")
    sampler = config.get("sampler", "default")
    if sampler not in _SAMPLERS:
        raise config_where.error("sampler", f"expected one of {', '.join(_SAMPLERS)}, got {sampler!r}")
    if config.get("split") is not None:
        fewshot_split = _expect(config_where, "split", config["split"], str, "a split name")
    return _SAMPLERS[sampler], fewshot_split
