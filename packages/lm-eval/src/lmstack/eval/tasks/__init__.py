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
    GenerationKwargs,
    GroupConfig,
    GroupMetric,
    MetricConfig,
    SplitConfig,
    TaskConfig,
)
from lmstack.eval.tasks._requests import ChatMessage, DocTarget, Request
from lmstack.eval.tasks._task import Task, load_task
from lmstack.eval.tasks._yaml import load_task_config, load_task_file

__all__ = [
    "ChatConfig",
    "ChatMessage",
    "CodeConfig",
    "DatasetConfig",
    "DocTarget",
    "GenerationKwargs",
    "GroupConfig",
    "GroupMetric",
    "MetricConfig",
    "Request",
    "SplitConfig",
    "Task",
    "TaskConfig",
    "load_task",
    "load_task_config",
    "load_task_file",
]
