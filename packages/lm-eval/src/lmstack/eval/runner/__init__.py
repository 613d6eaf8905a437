"""The runner: requests -> deduplicated calls -> model answers in a SQLite cache -> scores.

* :class:`AnswerCache` / :func:`merge_caches`: answers keyed by (model fingerprint, call key),
  committed per batch; shard caches joined with conflicts refused.
* :func:`model_info`: a model's fingerprint (see :mod:`lmstack.eval.runner._fingerprint` for what is
  hashed and why).
* :class:`Call`, :class:`Shard`: the unit of work and the deterministic split of a run.
* :func:`answer_calls`, :func:`score_task`: the inference and scoring stages that
  :func:`lmstack.eval.evaluate` chains.
"""

from __future__ import annotations

from lmstack.eval.runner._cache import AnswerCache, CacheError, ModelInfo, merge_caches
from lmstack.eval.runner._calls import Call, Shard, build_calls, parse_shard
from lmstack.eval.runner._execute import DEFAULT_BATCH_SIZE, CacheStats, answer_calls
from lmstack.eval.runner._fingerprint import fingerprint_dir, model_info
from lmstack.eval.runner._score import DEFAULT_METRICS, TaskScore, resolve_metrics, score_task
from lmstack.eval.runner._tasks import resolve_tasks

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_METRICS",
    "AnswerCache",
    "CacheError",
    "CacheStats",
    "Call",
    "ModelInfo",
    "Shard",
    "TaskScore",
    "answer_calls",
    "build_calls",
    "fingerprint_dir",
    "merge_caches",
    "model_info",
    "parse_shard",
    "resolve_metrics",
    "resolve_tasks",
    "score_task",
]
