"""Task files: lmstack's own YAML format and lm-evaluation-harness task YAML (its common subset).

A file with a top-level ``task`` key is read as an lm-eval task; one with ``name`` as lmstack's own.
lm-eval keys outside the supported subset (``include``, ``!function``, ``filter_list``, ``process_docs``,
...) are errors that name the key and the file: lmstack never runs Python named by a task file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lmstack.eval._errors import TaskConfigError
from lmstack.eval.tasks._config import (
    DATASET_FORMATS,
    DatasetConfig,
    GenerationKwargs,
    SplitConfig,
    TaskConfig,
    _expect,
    _Where,
    parse_choice_spec,
    parse_metrics,
    resolve_data_files,
)

__all__ = ["from_lm_eval_dict", "load_task_config"]

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


def load_task_config(path: str | Path) -> TaskConfig:
    """Read a task file in lmstack's own format or as an lm-evaluation-harness task YAML.

    Relative data files resolve against the file's directory.

    Raises:
        TaskConfigError: The file is unreadable, not YAML, or has an unknown or unsupported key
            (the message names the key and the file).
    """
    path = Path(path)
    data = _read_yaml(path)
    where = _Where(path)
    _refuse_functions(where, data, "")
    if "task" in data and "name" in data:
        raise where.error(
            "name", "a task file has either `task` (lm-evaluation-harness) or `name` (lmstack), not both"
        )
    if "task" in data:
        return from_lm_eval_dict(data, source=path)
    if "name" in data:
        return TaskConfig.from_dict(data, source=path)
    if "group" in data:
        raise where.error("group", "lm-evaluation-harness groups are not supported; list the tasks instead")
    raise TaskConfigError(
        f"task file {path} has neither `name` (lmstack's format) nor `task` (lm-evaluation-harness's)",
        source=path,
    )


def from_lm_eval_dict(data: Mapping[str, Any], *, source: str | Path | None = None) -> TaskConfig:
    """Translate an lm-evaluation-harness task mapping (the supported subset) to a :class:`TaskConfig`.

    Relative ``dataset_kwargs.data_files`` resolve against the directory of ``source`` when given.
    """
    path = None if source is None else Path(source)
    where = _Where(path)
    _refuse_functions(where, data, "")
    for key in data:
        if key not in _LM_EVAL_KEYS:
            raise where.error(
                str(key),
                "is an lm-evaluation-harness key that lmstack does not support; the supported ones are "
                + ", ".join(_LM_EVAL_KEYS),
            )
    if data.get("repeats", 1) != 1:
        raise where.error("repeats", "only repeats: 1 is supported")
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
        dataset=_dataset(where, data, base_dir=None if path is None else path.parent),
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
