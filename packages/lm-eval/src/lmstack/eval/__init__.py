"""lmstack.eval: benchmarks and evaluation on any model behind the LLM protocol.

* :func:`evaluate` (and ``lmstack eval``): tasks against any LLM-protocol model, every answer in a
  SQLite cache keyed by model fingerprint and request hash (a killed run resumes with nothing
  recomputed), ``--shard i/n`` with mergeable caches, and ``results.json`` / ``results.md`` /
  ``samples/``; :func:`rescore` scores a cache again without a model. See :mod:`lmstack.eval.runner`.
* :mod:`lmstack.eval.tasks`: tasks as data — :class:`TaskConfig` from lmstack's YAML or Python, or an
  lm-evaluation-harness task YAML (:func:`load_task_config`); local jsonl / json / csv / parquet data;
  jinja2 templates; few-shot examples seeded per document; chat-template mode; typed
  :class:`Request` objects with stable hashes, and per-document :class:`DocTarget` answers.
* :mod:`lmstack.eval.metrics`: acc / acc_norm, exact match with normalisers and answer extraction,
  math answer equivalence, BLEU, ROUGE-L, perplexities and bits per byte, pass@k, mean and bootstrap
  standard errors, micro / macro groups; a registry by name (:func:`get_metric`).
* :class:`TransformersLLM`: a transformers model (greedy generation and scoring) to evaluate as a
  reference beside lmstack's engine.
"""

from lmstack.eval._api import EvalResult, evaluate, rescore
from lmstack.eval._errors import (
    DatasetError,
    EvalError,
    MetricError,
    TaskConfigError,
    TemplateError,
    UnknownTaskError,
)
from lmstack.eval._reference import TransformersLLM
from lmstack.eval.metrics import Metric, Score, UnknownMetricError, get_metric, metric_names
from lmstack.eval.tasks import DocTarget, Request, Task, TaskConfig, load_task, load_task_config

__version__ = "0.1.0"

__all__ = [
    "DatasetError",
    "DocTarget",
    "EvalError",
    "EvalResult",
    "Metric",
    "MetricError",
    "Request",
    "Score",
    "Task",
    "TaskConfig",
    "TaskConfigError",
    "TemplateError",
    "TransformersLLM",
    "UnknownMetricError",
    "UnknownTaskError",
    "__version__",
    "evaluate",
    "get_metric",
    "load_task",
    "load_task_config",
    "metric_names",
    "rescore",
]
