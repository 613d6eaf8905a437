"""``lmstack.eval.evaluate``: tasks in, scores out, every model answer cached on the way.

The run has two stages. Inference builds every task's requests, deduplicates them into calls, and
answers the calls not yet in the cache (longest first, in batches, each committed as it returns).
Scoring reads the answers back and computes the metrics; :func:`rescore` runs it alone, from a cache,
without any model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import platform
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.eval._errors import EvalError
from lmstack.eval.runner._cache import AnswerCache, ModelInfo
from lmstack.eval.runner._calls import Call, Shard, build_calls, parse_shard
from lmstack.eval.runner._execute import DEFAULT_BATCH_SIZE, CacheStats, answer_calls
from lmstack.eval.runner._fingerprint import model_info
from lmstack.eval.runner._score import (
    ResolvedMetric,
    TokenCounter,
    resolve_metrics,
    rolling_token_counter,
    score_groups,
    score_task,
)
from lmstack.eval.runner._tasks import TaskGroup, TaskSpec, resolve_run
from lmstack.eval.tasks import Request, Task

__all__ = ["EvalResult", "GroupResult", "MetricValue", "TaskResult", "evaluate", "rescore"]

CACHE_FILE = "cache.sqlite"


@dataclass(frozen=True)
class MetricValue:
    """One metric of one task.

    Attributes:
        value: The corpus-level value.
        stderr: Its standard error (None for one sample).
        n: Samples aggregated.
        higher_is_better: The metric's direction.
    """

    value: float
    stderr: float | None
    n: int
    higher_is_better: bool


@dataclass
class TaskResult:
    """One task's results.

    Attributes:
        name: The task's name.
        metrics: Metric name -> value.
        num_docs: Documents evaluated.
        prompt_hash: sha256 over every request sent (equal exactly when all prompts are equal).
        output_type: The task's output type.
        num_fewshot: Few-shot examples per document.
        config: The task definition, as JSON-able data.
        samples: Per-document records (what ``samples/<task>.jsonl`` holds).
    """

    name: str
    metrics: dict[str, MetricValue]
    num_docs: int
    prompt_hash: str
    output_type: str
    num_fewshot: int
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(repr=False)


@dataclass
class GroupResult:
    """One group's averages over its members (``groups`` in ``results.json``).

    Attributes:
        name: The group's name.
        members: Its member tasks and subgroups.
        metrics: Metric name -> the average (``n``: the members' samples together).
        weighting: Metric name -> ``micro`` (weighted by size) or ``macro``.
    """

    name: str
    members: tuple[str, ...]
    metrics: dict[str, MetricValue]
    weighting: dict[str, str]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns (and ``results.json`` holds).

    Attributes:
        model: The model's name, fingerprint and kind.
        tasks: Task name -> results (empty for a shard run, which only fills its cache).
        cache: Calls served from the cache (hits) and computed in this run (misses).
        config: The run's options.
        created: When the run finished (ISO 8601, UTC).
        versions: Versions of lmstack's libraries, Python and torch.
        cache_path: The cache file, when there is one.
        groups: Group name -> its averages, for the groups the tasks came in.
    """

    model: ModelInfo
    tasks: dict[str, TaskResult]
    cache: CacheStats
    config: dict[str, Any]
    created: str
    versions: dict[str, str]
    cache_path: Path | None = None
    groups: dict[str, GroupResult] = field(default_factory=dict)

    def score(self, task: str, metric: str) -> float:
        """The value of one metric of one task."""
        return self.tasks[task].metrics[metric].value

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document."""
        from lmstack.eval.report._results import results_dict

        return results_dict(self)

    def table(self) -> str:
        """The Markdown table of ``results.md``."""
        from lmstack.eval.report._results import results_markdown

        return results_markdown(self)

    def save(self, output_dir: str | Path) -> Path:
        """Write ``results.json``, ``results.md`` and ``samples/`` into ``output_dir``."""
        from lmstack.eval.report._results import write_results

        return write_results(self, output_dir)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("lmstack-eval", "lmstack-infer", "lmstack-core", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class _Plan:
    """One task's part of a run: its documents, requests, their call keys and metrics."""

    task: Task
    doc_ids: list[int]
    requests: list[Request]
    keys: list[str]
    metrics: list[ResolvedMetric]
    num_fewshot: int


def _plan(
    tasks: Sequence[Task], *, limit: int | None, num_fewshot: int | None, max_length: int | None
) -> tuple[list[_Plan], dict[str, Call]]:
    plans: list[_Plan] = []
    calls: dict[str, Call] = {}
    for task in tasks:
        metrics = resolve_metrics(task)  # before any model runs: a bad metric fails fast
        doc_ids = task.select(limit=limit)
        requests = task.build_requests(doc_ids=doc_ids, num_fewshot=num_fewshot)
        keys, task_calls = build_calls(requests, samples=task.config.code_samples, max_length=max_length)
        for key, call in task_calls.items():
            calls.setdefault(key, call)
        shots = task.config.num_fewshot if num_fewshot is None else num_fewshot
        plans.append(_Plan(task, doc_ids, requests, keys, metrics, shots))
    return plans, calls


def _groups(groups: Sequence[TaskGroup], tasks: dict[str, TaskResult]) -> dict[str, GroupResult]:
    scored = score_groups(groups, {name: task.metrics for name, task in tasks.items()})
    return {
        name: GroupResult(
            name,
            g.members,
            {m: MetricValue(s.value, s.stderr, s.n, g.higher_is_better[m]) for m, s in g.scores.items()},
            g.weighting,
        )
        for name, g in scored.items()
    }


def _score(
    plans: Sequence[_Plan], cache: AnswerCache, fingerprint: str, count_tokens: TokenCounter | None
) -> dict[str, TaskResult]:
    results: dict[str, TaskResult] = {}
    for plan in plans:
        answers = cache.get(fingerprint, plan.keys)
        missing = [key for key in plan.keys if key not in answers]
        if missing:
            raise EvalError(
                f"task {plan.task.name}: {len(set(missing))} answers are missing from the cache {cache.path} "
                "(run the model over it, or merge every shard's cache first)"
            )
        scored = score_task(
            plan.task,
            plan.requests,
            [answers[k] for k in plan.keys],
            plan.metrics,
            doc_ids=plan.doc_ids,
            count_tokens=count_tokens,
        )
        metrics = {
            name: MetricValue(s.value, s.stderr, s.n, scored.higher_is_better[name])
            for name, s in scored.scores.items()
        }
        results[plan.task.name] = TaskResult(
            name=plan.task.name,
            metrics=metrics,
            num_docs=len(plan.doc_ids),
            prompt_hash=plan.task.prompt_hash(plan.requests),
            output_type=plan.task.config.output_type,
            num_fewshot=plan.num_fewshot,
            config=_jsonable(plan.task.config),
            samples=scored.samples,
        )
    return results


def _open_model(model: Any, stack: ExitStack) -> tuple[Any, Path | None]:
    """The LLM-protocol object for ``model`` and the directory it came from (closed with ``stack``)."""
    from lmstack.infer import LLM, LLMProtocol, RemoteLLM

    if isinstance(model, (str, Path)):
        text = str(model)
        if text.startswith(("http://", "https://")):
            remote = RemoteLLM(text)
            stack.callback(remote.close)
            return remote, None
        path = Path(text)
        if not (path / "config.json").is_file():
            raise EvalError(
                f"model {text!r} is neither an http(s) URL nor a model directory with config.json"
            )
        llm = LLM(path)
        stack.callback(llm.close)
        return llm, path
    if not isinstance(model, LLMProtocol):
        raise EvalError(
            f"model must be an LLM-protocol object, a model directory or a URL, got {type(model).__name__}"
        )
    return model, None


def _cache_path(cache: str | Path | None, output_dir: Path | None, shard: Shard | None) -> Path | None:
    if cache != "auto":
        return None if cache is None else Path(cache)
    if output_dir is None:
        return None
    if shard is not None:
        return output_dir / f"cache.shard{shard.index}of{shard.count}.sqlite"
    return output_dir / CACHE_FILE


def evaluate(
    model: Any,
    tasks: TaskSpec | Sequence[TaskSpec],
    *,
    output_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    shard: str | tuple[int, int] | Shard | None = None,
    cache: str | Path | None = "auto",
    data_dir: str | Path | None = None,
    use_tqdm: bool | None = None,
    max_length: int | None = None,
    model_name: str | None = None,
    fingerprint: str | None = None,
) -> EvalResult:
    """Evaluate a model on tasks.

    Args:
        model: An LLM-protocol object (``LLM``, ``RemoteLLM``, ...), a local model directory, or an
            http(s) URL of an OpenAI-compatible server (a ``RemoteLLM``; build one yourself for a
            tokenizer, an API key or retries).
        tasks: Task files (lmstack's or lm-evaluation-harness's YAML), built-in task names, ``Task`` or
            ``TaskConfig`` objects; a string may list several, comma-separated.
        output_dir: Where ``results.json``, ``results.md``, ``samples/`` and (by default) the cache go.
        num_fewshot: Overrides every task's ``num_fewshot``.
        limit: Evaluate each task's first ``limit`` documents.
        batch_size: Calls per model invocation and per cache commit (default 64).
        shard: ``"i/n"``: compute only shard ``i`` (0-based) of ``n`` of the calls, into this shard's
            own cache file, and score nothing; merge the caches (``lmstack eval merge``) and run again
            without ``shard`` to score.
        cache: The SQLite cache file; ``"auto"``: ``output_dir/cache.sqlite`` (a shard's own file
            when sharded), or memory without ``output_dir``; None: memory.
        data_dir: Where built-in tasks find their data.
        use_tqdm: Show a progress bar (default: only on an interactive terminal).
        max_length: The window of rolling log-likelihoods (default: a local model's ``max_model_len``,
            else the model's own default).
        model_name: The name results give the model.
        fingerprint: The model's cache fingerprint (required for LLM-protocol objects other than
            ``LLM`` and ``RemoteLLM``).

    Returns:
        The scores, per-sample records and cache counts; also written to ``output_dir`` when given.

    Raises:
        UnknownTaskError: A task is neither a file nor a built-in name.
        TaskConfigError: A bad task file, metric or metric option (before the model runs).
        EvalError: The model failed (the cache keeps every answer committed before).
    """
    out = None if output_dir is None else Path(output_dir)
    run_shard = parse_shard(shard)
    task_list, groups = resolve_run(tasks, data_dir=data_dir)
    with ExitStack() as stack:
        llm, path = _open_model(model, stack)
        info = model_info(llm, path=path, name=model_name, fingerprint=fingerprint)
        window = max_length if max_length is not None else getattr(llm, "max_model_len", None)
        plans, calls = _plan(task_list, limit=limit, num_fewshot=num_fewshot, max_length=window)
        keys = sorted(calls)
        if run_shard is not None:
            keys = run_shard.select(keys)
        cache_file = _cache_path(cache, out, run_shard)
        answer_cache = stack.enter_context(closing(AnswerCache(cache_file)))
        answer_cache.add_model(info)
        answer_cache.set_meta(f"max_length:{info.fingerprint}", str(window))
        stats = answer_calls(
            llm,
            [calls[k] for k in keys],
            answer_cache,
            info.fingerprint,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            max_length=window,
            use_tqdm=use_tqdm,
            describe_model=f"model {info.name}",
        )
        config = {
            "model": str(model) if isinstance(model, (str, Path)) else info.name,
            "tasks": [t.name for t in task_list],
            "groups": [g.name for g in groups],
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size or DEFAULT_BATCH_SIZE,
            "max_length": window,
            "shard": None if run_shard is None else str(run_shard),
            "cache": None if cache_file is None else str(cache_file),
            "num_calls": len(calls),
        }
        # getattr: a RemoteLLM without a tokenizer raises an AttributeError; token counts then come
        # only from the answers.
        count_tokens = rolling_token_counter(getattr(llm, "tokenizer", None))
        scored = {} if run_shard is not None else _score(plans, answer_cache, info.fingerprint, count_tokens)
    group_results = {} if run_shard is not None else _groups(groups, scored)
    result = EvalResult(info, scored, stats, config, _now(), _versions(), cache_file, group_results)
    if out is not None and run_shard is None:
        result.save(out)
    return result


def rescore(
    tasks: TaskSpec | Sequence[TaskSpec],
    cache: str | Path,
    *,
    fingerprint: str | None = None,
    output_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    max_length: int | None = None,
    tokenizer: Any = None,
) -> EvalResult:
    """Score tasks from a cache alone: no model is loaded or called.

    Args:
        tasks: As :func:`evaluate` takes them.
        cache: The cache file of an earlier run (or of merged shards).
        fingerprint: Which model's answers to score; may be left out when the cache holds one model.
        output_dir: Where to write the results.
        num_fewshot: As the run that filled the cache used.
        limit: As the run that filled the cache used.
        data_dir: Where built-in tasks find their data.
        max_length: The rolling window (part of a rolling call's key); default: the one the run recorded.
        tokenizer: The model's tokenizer (a :class:`lmstack.core.Tokenizer` or the model directory), to
            count rolling texts' tokens for ``token_perplexity`` when the cached answers lack them.

    Raises:
        EvalError: The cache is missing, holds several models and no ``fingerprint`` was given, or
            lacks answers that the tasks need.
    """
    if not Path(cache).is_file():
        raise EvalError(f"cache file {cache} does not exist")
    task_list, groups = resolve_run(tasks, data_dir=data_dir)
    if isinstance(tokenizer, (str, Path)):
        from lmstack.core import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer)
    with closing(AnswerCache(cache)) as answer_cache:
        models = answer_cache.models()
        chosen = [m for m in models if fingerprint is None or m.fingerprint.startswith(fingerprint)]
        if len(chosen) != 1:
            listed = ", ".join(f"{m.name} ({m.fingerprint[:16]})" for m in models) or "none"
            raise EvalError(
                f"cache {cache} holds answers of {len(models)} models ({listed}); pass fingerprint="
            )
        info = chosen[0]
        if max_length is None:
            recorded = answer_cache.get_meta(f"max_length:{info.fingerprint}")
            max_length = None if recorded in (None, "None") else int(recorded)
        plans, calls = _plan(task_list, limit=limit, num_fewshot=num_fewshot, max_length=max_length)
        stats = CacheStats(hits=len(calls))
        scored = _score(plans, answer_cache, info.fingerprint, rolling_token_counter(tokenizer))
    config = {
        "rescored_from": str(cache),
        "tasks": [t.name for t in task_list],
        "groups": [g.name for g in groups],
        "num_fewshot": num_fewshot,
        "limit": limit,
        "max_length": max_length,
        "num_calls": len(calls),
    }
    result = EvalResult(
        info, scored, stats, config, _now(), _versions(), Path(cache), _groups(groups, scored)
    )
    if output_dir is not None:
        result.save(output_dir)
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
