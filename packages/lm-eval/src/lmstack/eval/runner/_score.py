"""Scoring: cached answers + each document's target -> per-sample metric items -> scores.

Scoring reads no model, only answers, so a run can be rescored (new metrics, new extraction) from its
cache. Metric options as tasks give them are cleaned first: lm-evaluation-harness's ``aggregation``
and ``higher_is_better`` are dropped (the registry knows both), and ``extract`` (the arguments of
:func:`lmstack.eval.metrics.extract_answer`, or a list of strategy names) pulls the answer out of a
generated reply before the metric compares it.

A rolling log-likelihood's token count (what ``token_perplexity`` divides by) is taken from the answer
when the cache recorded one, else counted with the model's tokenizer exactly as the model tokenized the
text; caches written before token counts existed stay readable for every other metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lmstack.eval._errors import EvalError, TaskConfigError
from lmstack.eval.metrics import (
    ChoiceResult,
    CodeResult,
    GenerationResult,
    LoglikelihoodResult,
    Metric,
    RollingResult,
    Score,
    extract_answer,
    get_metric,
    group_score,
)
from lmstack.eval.metrics._errors import MetricError
from lmstack.eval.tasks import DocTarget, MetricConfig, Request, Task

if TYPE_CHECKING:
    from lmstack.eval.runner._tasks import TaskGroup

__all__ = [
    "DEFAULT_METRICS",
    "GroupScore",
    "ResolvedMetric",
    "TaskScore",
    "resolve_metrics",
    "rolling_token_counter",
    "score_groups",
    "score_task",
]

TokenCounter = Callable[[str], int]

# What a task reports when it lists no metrics (lm-evaluation-harness's defaults per output type).
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "generate_until": ("exact_match",),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
_IGNORED_OPTIONS = ("aggregation", "higher_is_better")
_RESULT_TYPE = {
    "multiple_choice": ChoiceResult,
    "loglikelihood": LoglikelihoodResult,
    "generate_until": GenerationResult,
    "loglikelihood_rolling": RollingResult,
}
# Sandboxed programs run at once: each is a separate process tree that mostly waits on its limits.
_CODE_WORKERS = 4


@dataclass(frozen=True)
class ResolvedMetric:
    """A task's metric, looked up and with its options checked.

    Attributes:
        metric: The registry's metric.
        options: Options for :meth:`Metric.item`.
        extract: Arguments of :func:`extract_answer`, when the reply is extracted first.
    """

    metric: Metric
    options: Mapping[str, Any] = field(default_factory=dict)
    extract: Mapping[str, Any] | None = None


def _extract_options(task: Task, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"strategies": [value]}
    if isinstance(value, list):
        return {"strategies": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TaskConfigError(
        f"task {task.name}: metric option extract must be a strategy, a list of them or a mapping of "
        f"extract_answer arguments, got {value!r}",
        key="metrics",
        source=task.config.source,
    )


def resolve_metrics(task: Task) -> list[ResolvedMetric]:
    """Look up a task's metrics and check them against its output type, before any model runs.

    Raises:
        TaskConfigError: An unknown metric or option, or a metric that cannot score this output type
            (naming the task file).
    """
    config = task.config
    listed = config.metrics or tuple(
        MetricConfig(name)
        for name in (("pass@1",) if config.code is not None else DEFAULT_METRICS[config.output_type])
    )
    result_type = CodeResult if config.code is not None else _RESULT_TYPE[config.output_type]
    where = f" (task file {config.source})" if config.source else ""
    resolved = []
    for metric_config in listed:
        options = {k: v for k, v in metric_config.options.items() if k not in _IGNORED_OPTIONS}
        extract = options.pop("extract", None)
        try:
            metric = get_metric(metric_config.name)
            metric.check_options(options)
        except MetricError as err:
            raise TaskConfigError(
                f"task {task.name}{where}: {err}", key="metrics", source=config.source
            ) from err
        if result_type not in metric.result_types:
            hint = (
                " (add a `code:` section to run the completions)"
                if metric.result_types == (CodeResult,)
                else ""
            )
            raise TaskConfigError(
                f"task {task.name}{where}: metric {metric.name!r} cannot score {config.output_type} "
                f"outputs{hint}",
                key="metrics",
                source=config.source,
            )
        if extract is not None and result_type is not GenerationResult:
            raise TaskConfigError(
                f"task {task.name}{where}: metric option extract only applies to generated replies",
                key="metrics",
                source=config.source,
            )
        parsed = None if extract is None else _extract_options(task, extract)
        resolved.append(ResolvedMetric(metric, options, parsed))
    return resolved


@dataclass
class TaskScore:
    """One task's scores and per-sample records.

    Attributes:
        scores: Metric name -> score.
        higher_is_better: Metric name -> direction.
        samples: One record per document: doc_id, prompt(s), answer(s), target, per-metric item.
    """

    scores: dict[str, Score]
    higher_is_better: dict[str, bool]
    samples: list[dict[str, Any]]


def rolling_token_counter(tokenizer: Any) -> TokenCounter | None:
    """Count a text's tokens as ``loglikelihood_rolling`` scores them (None without a tokenizer).

    Args:
        tokenizer: The model's :class:`lmstack.core.Tokenizer`, or None.

    Returns:
        ``count(text)``: how many tokens the text's rolling log-likelihood sums over.
    """
    if tokenizer is None:
        return None
    # The model's own tokenization of a rolling text (special tokens, a leading prefix token), reused
    # so that the count can never drift from what was scored.
    from lmstack.infer.protocol import rolling_token_lists

    return lambda text: len(rolling_token_lists([text], tokenizer, None)[0])


def _num_tokens(
    task: Task, answer: Mapping[str, Any], text: str, count_tokens: TokenCounter | None, needed: bool
) -> int | None:
    if "num_tokens" in answer:
        return int(answer["num_tokens"])
    if count_tokens is not None:
        return count_tokens(text)
    if needed:
        raise EvalError(
            f"task {task.name}: token_perplexity needs each document's token count, which the cached "
            "answers do not hold: score with the model (or pass its tokenizer) so the runner can count them"
        )
    return None


def _references(target: DocTarget) -> list[str]:
    return list(target.text) if isinstance(target.text, tuple) else [target.text]


def _passes(task: Task, doc_id: int, texts: Sequence[str]) -> list[bool]:
    from lmstack.core.sandbox import run_python

    code = task.config.code
    assert code is not None
    programs = [task.program(doc_id, text) for text in texts]
    with ThreadPoolExecutor(max_workers=min(_CODE_WORKERS, len(programs))) as pool:
        results = list(
            pool.map(lambda p: run_python(p, timeout_s=code.timeout_s, memory_mb=code.memory_mb), programs)
        )
    return [r.ok for r in results]


def _choice_loglikelihoods(
    pairs: Sequence[tuple[Request, Mapping[str, Any]]], num_choices: int
) -> list[float]:
    """One log-likelihood per choice.

    A choice asked as several requests (several phrasings of the same answer, as the world's
    statements task does) scores the log of their summed probabilities.
    """
    by_choice: dict[int, list[float]] = {}
    for index, (request, answer) in enumerate(pairs):
        choice = index if request.choice_index is None else request.choice_index
        by_choice.setdefault(choice, []).append(float(answer["loglikelihood"]))
    if sorted(by_choice) != list(range(num_choices)):
        raise MetricError(
            f"the requests name choices {sorted(by_choice)} but the document has {num_choices} choices"
        )
    return [math.log(math.fsum(math.exp(v - max(lls)) for v in lls)) + max(lls) for lls in
            (by_choice[i] for i in range(num_choices))]  # fmt: skip


def _doc_result(
    task: Task,
    target: DocTarget,
    pairs: Sequence[tuple[Request, Mapping[str, Any]]],
    record: dict[str, Any],
    count_tokens: TokenCounter | None,
    needs_tokens: bool,
) -> Any:
    kind = task.config.output_type
    answers = [a for _, a in pairs]
    if kind == "multiple_choice":
        assert target.choices is not None and target.gold is not None
        lls = _choice_loglikelihoods(pairs, len(target.choices))
        record["loglikelihoods"] = lls
        record["is_greedy"] = [a["is_greedy"] for a in answers]
        return ChoiceResult(lls, target.choices, target.gold)
    (answer,) = answers
    if kind == "loglikelihood":
        return LoglikelihoodResult(answer["loglikelihood"], answer["is_greedy"])
    if kind == "loglikelihood_rolling":
        text = _references(target)[0]
        num_tokens = _num_tokens(task, answer, text, count_tokens, needs_tokens)
        if num_tokens is not None:
            record["num_tokens"] = num_tokens
        return RollingResult(answer["loglikelihood"], text, num_tokens)
    texts = answer["texts"]
    if task.config.code is not None:
        passed = _passes(task, target.doc_id, texts)
        record["passed"] = passed
        return CodeResult(len(texts), sum(passed))
    return GenerationResult(texts[0], _references(target))


def score_task(
    task: Task,
    requests: Sequence[Request],
    answers: Sequence[Mapping[str, Any]],
    metrics: Sequence[ResolvedMetric],
    *,
    doc_ids: Sequence[int],
    count_tokens: TokenCounter | None = None,
) -> TaskScore:
    """Score one task from the answers to its requests.

    Args:
        task: The task.
        requests: Its requests, as :meth:`Task.build_requests` made them.
        answers: The answer to each request, in the same order.
        metrics: :func:`resolve_metrics`'s output for the task.
        doc_ids: The evaluated documents, in order.
        count_tokens: Counts a rolling text's tokens (:func:`rolling_token_counter`) when the answers
            do not record them.

    Raises:
        EvalError: ``token_perplexity`` is asked for but neither the answers nor ``count_tokens`` give
            the token counts.
    """
    needs_tokens = any(m.metric.name == "token_perplexity" for m in metrics)
    by_doc: dict[int, list[tuple[Request, Mapping[str, Any]]]] = {doc_id: [] for doc_id in doc_ids}
    for request, answer in zip(requests, answers, strict=True):
        by_doc[request.doc_id].append((request, answer))
    items: dict[str, list[Any]] = {m.metric.name: [] for m in metrics}
    samples = []
    for doc_id in doc_ids:
        pairs = by_doc[doc_id]
        target = task.target(doc_id)
        first = pairs[0][0]
        record: dict[str, Any] = {
            "doc_id": doc_id,
            "prompt": first.context if isinstance(first.context, str) else first.messages(),
        }
        if first.kind == "loglikelihood":
            record["continuations"] = [r.continuation for r, _ in pairs]
        record["answers"] = [a for _, a in pairs]
        record["target"] = target.text if isinstance(target.text, str) else list(target.text)
        if target.gold is not None:
            record["gold"] = target.gold if isinstance(target.gold, int) else list(target.gold)
        result = _doc_result(task, target, pairs, record, count_tokens, needs_tokens)
        record["metrics"] = {}
        for resolved in metrics:
            sample_result = result
            if resolved.extract is not None:
                extraction = extract_answer(result.prediction, **resolved.extract)
                record.setdefault("extracted", {})[resolved.metric.name] = extraction.answer
                sample_result = GenerationResult(extraction.answer, result.references)
            item = resolved.metric.item(sample_result, **resolved.options)
            items[resolved.metric.name].append(item)
            record["metrics"][resolved.metric.name] = item
        samples.append(record)
    scores = {
        name: next(m.metric for m in metrics if m.metric.name == name).score(values)
        for name, values in items.items()
    }
    higher = {m.metric.name: m.metric.higher_is_better for m in metrics}
    return TaskScore(scores, higher, samples)


class _Reported(Protocol):
    """A reported metric value (as :class:`lmstack.eval.MetricValue` holds it)."""

    @property
    def value(self) -> float: ...
    @property
    def stderr(self) -> float | None: ...
    @property
    def n(self) -> int: ...
    @property
    def higher_is_better(self) -> bool: ...


@dataclass
class GroupScore:
    """One group's averaged metrics.

    Attributes:
        members: Its member tasks and subgroups.
        scores: Metric name -> the average over the members.
        higher_is_better: Metric name -> direction (the members').
        weighting: Metric name -> ``micro`` (weighted by size) or ``macro``.
    """

    members: tuple[str, ...]
    scores: dict[str, Score]
    higher_is_better: dict[str, bool]
    weighting: dict[str, str]


def score_groups(
    groups: Sequence[TaskGroup], results: Mapping[str, Mapping[str, _Reported]]
) -> dict[str, GroupScore]:
    """Average each group's metrics over its members with :func:`lmstack.eval.metrics.group_score`.

    Args:
        groups: The run's groups, each after its subgroups (as :func:`resolve_run` orders them).
        results: Task name -> metric name -> its reported value.

    Returns:
        Group name -> its scores; a subgroup counts as one member with its own average and total size.

    Raises:
        EvalError: A member does not report a metric its group averages.
    """
    scored: dict[str, GroupScore] = {}
    reported: dict[str, Mapping[str, _Reported]] = dict(results)
    for group in groups:
        scores: dict[str, Score] = {}
        higher: dict[str, bool] = {}
        weighting: dict[str, str] = {}
        for aggregate in group.aggregate:
            name = aggregate.metric
            missing = [m for m in group.members if name not in reported[m]]
            if missing:
                raise EvalError(
                    f"group {group.name} averages {name}, which its members {', '.join(missing)} "
                    "do not report"
                )
            values = [reported[m][name] for m in group.members]
            weighting[name] = "micro" if aggregate.weight_by_size else "macro"
            scores[name] = group_score(
                [Score(v.value, v.stderr, v.n) for v in values],
                "micro" if aggregate.weight_by_size else "macro",
            )
            higher[name] = values[0].higher_is_better
        scored[group.name] = GroupScore(group.members, scores, higher, weighting)
        reported[group.name] = {
            name: _GroupValue(score.value, score.stderr, score.n, higher[name])
            for name, score in scores.items()
        }
    return scored


@dataclass(frozen=True)
class _GroupValue:
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool
