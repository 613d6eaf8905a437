"""Task definitions: documents, prompts, few-shot examples, and the requests and targets built from them.

A task is data: lmstack's own YAML (or a :class:`TaskConfig` built in Python), or an
lm-evaluation-harness task YAML in its common subset. :func:`load_task` reads either, and
:meth:`Task.build_requests` turns the documents into typed :class:`Request` objects for the LLM protocol.
"""

from __future__ import annotations

from lmstack.eval.tasks._config import (
    ChatConfig,
    CodeConfig,
    DatasetConfig,
    DatasetFormat,
    FewshotSampler,
    GenerationKwargs,
    GroupConfig,
    GroupMetric,
    MetricConfig,
    OutputType,
    SplitConfig,
    TaskConfig,
)
from lmstack.eval.tasks._data import read_data_file, read_split
from lmstack.eval.tasks._requests import ChatMessage, DocTarget, Request, RequestKind, prompt_hash
from lmstack.eval.tasks._task import Task, fewshot_seed, load_task
from lmstack.eval.tasks._yaml import from_lm_eval_dict, load_task_config, load_task_file

__all__ = [
    "ChatConfig",
    "ChatMessage",
    "CodeConfig",
    "DatasetConfig",
    "DatasetFormat",
    "DocTarget",
    "FewshotSampler",
    "GenerationKwargs",
    "GroupConfig",
    "GroupMetric",
    "MetricConfig",
    "OutputType",
    "Request",
    "RequestKind",
    "SplitConfig",
    "Task",
    "TaskConfig",
    "fewshot_seed",
    "from_lm_eval_dict",
    "load_task",
    "load_task_config",
    "load_task_file",
    "prompt_hash",
    "read_data_file",
    "read_split",
]
