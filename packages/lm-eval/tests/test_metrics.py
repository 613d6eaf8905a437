"""Metrics: multiple choice, likelihoods, pass@k, statistics and the registry.

The references are lm-evaluation-harness's own functions (its multiple-choice and rolling
`process_results`, `mean_stderr`, the group stderrs, the perplexity aggregations), the `statistics`
module and the combinatorial pass@k formula.
"""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import pytest
from lm_eval.api import metrics as lm_metrics
from lm_eval.api import task as lm_task

from lmstack.core import LMStackError
from lmstack.eval.metrics import (
    ChoiceResult,
    CodeResult,
    LoglikelihoodResult,
    Metric,
    MetricError,
    RollingResult,
    Score,
    UnknownMetricError,
    get_metric,
    group_score,
    metric_names,
    pass_at_k,
    register_metric,
)
from lmstack.eval.metrics._choice import first_argmax
from lmstack.eval.metrics._stats import bootstrap_stderr, mean, mean_stderr


def _lm_eval_process_results(output_type: str, doc: dict[str, Any], results: list[Any], metrics: list[str]):
    """Run lm-evaluation-harness's ConfigurableTask.process_results on a minimal task object."""
    stub = SimpleNamespace(
        config=SimpleNamespace(process_results=None, doc_to_choice=None),
        OUTPUT_TYPE=output_type,
        _metric_fn_list=dict.fromkeys(metrics),
        multiple_input=False,
        multiple_target=not isinstance(doc.get("gold", 0), int),
        doc_to_choice=lambda d: d["choices"],
        doc_to_target=lambda d: d["gold"] if output_type == "multiple_choice" else d["text"],
        count_words=lm_task.ConfigurableTask.count_words,
        count_bytes=lm_task.ConfigurableTask.count_bytes,
    )
    return lm_task.ConfigurableTask.process_results(stub, doc, results)


def _random_choice_docs(seed: int, count: int) -> list[tuple[list[str], list[float], int]]:
    rng = random.Random(seed)
    words = ["a", "cat", "elephant", "the big red one", "zebra crossing", "é", "日本", "42"]
    docs = []
    for _ in range(count):
        choices = rng.sample(words, rng.randint(2, 5))
        # Rounded log-likelihoods make ties (raw and after normalisation) common.
        lls = [-float(rng.randint(1, 8)) for _ in choices]
        docs.append((choices, lls, rng.randrange(len(choices))))
    return docs


def test_acc_acc_norm_acc_bytes_match_lm_eval_process_results() -> None:
    metrics = ["acc", "acc_norm", "acc_bytes"]
    for choices, lls, gold in _random_choice_docs(0, 300):
        expected = _lm_eval_process_results(
            "multiple_choice", {"choices": choices, "gold": gold}, [(ll, False) for ll in lls], metrics
        )
        result = ChoiceResult(lls, choices, gold)
        # Older lm-eval releases have no acc_bytes; the character/byte rule is checked by hand below.
        for name in [m for m in metrics if m in expected]:
            assert get_metric(name).item(result) == expected[name], (name, choices, lls, gold)
        by_bytes = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices, strict=True)]
        assert get_metric("acc_bytes").item(result) == float(by_bytes.index(max(by_bytes)) == gold)


def test_acc_with_several_gold_indices_matches_lm_eval() -> None:
    for choices, lls, gold in _random_choice_docs(1, 100):
        golds = sorted({gold, (gold + 1) % len(choices)})
        expected = _lm_eval_process_results(
            "multiple_choice", {"choices": choices, "gold": golds}, [(ll, False) for ll in lls], ["acc"]
        )
        assert get_metric("acc").item(ChoiceResult(lls, choices, golds)) == expected["acc"]


def test_acc_norm_divides_by_characters_and_ties_go_first() -> None:
    # " elephant" is 9 characters: -4.5 / 9 = -0.5 beats -2 / 2 = -1 although -2 > -4.5.
    result = ChoiceResult([-2.0, -4.5], [" a", " elephant"], gold=1)
    assert get_metric("acc").item(result) == 0.0
    assert get_metric("acc_norm").item(result) == 1.0
    assert first_argmax([1.0, 3.0, 3.0]) == 1
    assert get_metric("acc").item(ChoiceResult([-1.0, -1.0], ["x", "y"], gold=1)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loglikelihoods": [-1.0], "choices": ["a", "b"], "gold": 0}, "1 log-likelihoods for 2 choices"),
        ({"loglikelihoods": [-1.0, -2.0], "choices": ["a", "b"], "gold": 2}, "gold index 2 is out of range"),
        ({"loglikelihoods": [], "choices": [], "gold": 0}, "at least one choice"),
    ],
)
def test_bad_choice_results_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MetricError, match=message):
        ChoiceResult(**kwargs)


def test_acc_norm_on_an_empty_choice_is_a_clear_error() -> None:
    with pytest.raises(MetricError, match="choice is empty"):
        get_metric("acc_norm").item(ChoiceResult([-1.0, -2.0], ["", "b"], gold=0))


def test_loglikelihood_acc_and_perplexity_match_lm_eval() -> None:
    rng = random.Random(2)
    samples = [(-rng.uniform(0.1, 20.0), rng.random() < 0.5) for _ in range(50)]
    results = [LoglikelihoodResult(ll, greedy) for ll, greedy in samples]
    acc = get_metric("acc").score([get_metric("acc").item(r) for r in results])
    assert acc.value == pytest.approx(sum(g for _, g in samples) / len(samples))
    ppl = get_metric("perplexity")
    assert ppl.score([ppl.item(r) for r in results]).value == pytest.approx(
        lm_metrics.perplexity([ll for ll, _ in samples]), rel=1e-12
    )
    assert not ppl.higher_is_better


def test_rolling_metrics_match_lm_eval_process_results_and_aggregations() -> None:
    rng = random.Random(3)
    texts = ["The quick brown fox.", "  leading space", "naïve café 日本語\nsecond line", "one", "a b  c\td"]
    docs = [(text, -rng.uniform(1.0, 60.0)) for text in texts]
    names = ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    lm_items: dict[str, list[Any]] = {name: [] for name in names}
    ours: dict[str, list[Any]] = {name: [] for name in names}
    for text, ll in docs:
        expected = _lm_eval_process_results("loglikelihood_rolling", {"text": text}, [ll], names)
        for name in names:
            ours[name].append(get_metric(name).item(RollingResult(ll, text)))
            lm_items[name].append(expected[name])
            assert tuple(ours[name][-1]) == tuple(expected[name])
    lm_aggregate = {
        "word_perplexity": lm_metrics.weighted_perplexity,
        "byte_perplexity": lm_metrics.weighted_perplexity,
        "bits_per_byte": lm_metrics.bits_per_byte,
    }
    for name in names:
        value = get_metric(name).score(ours[name]).value
        assert value == pytest.approx(lm_aggregate[name](lm_items[name]), rel=1e-12)


def test_token_perplexity_and_bits_per_byte_known_values() -> None:
    # Two documents, 10 tokens in all, total log-likelihood -10 nats: perplexity e.
    results = [RollingResult(-4.0, "abcd", num_tokens=4), RollingResult(-6.0, "efghij", num_tokens=6)]
    metric = get_metric("token_perplexity")
    assert metric.score([metric.item(r) for r in results], bootstrap_iters=0).value == pytest.approx(math.e)
    bpb = get_metric("bits_per_byte")
    assert bpb.score([bpb.item(r) for r in results], bootstrap_iters=0).value == pytest.approx(
        1 / math.log(2)
    )
    with pytest.raises(MetricError, match="num_tokens"):
        metric.item(RollingResult(-1.0, "x"))
    with pytest.raises(MetricError, match="<= 0"):
        RollingResult(0.5, "x")


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 failing samples: any 3 contain a passing one
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)


def test_pass_at_k_equals_the_combinatorial_formula_on_a_grid() -> None:
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(10000, 500) overflows a float; the product form does not.
    exact = 1 - Fraction(math.comb(10000 - 7, 500), math.comb(10000, 500))
    assert pass_at_k(10000, 7, 500) == pytest.approx(float(exact), rel=1e-9)


def test_pass_at_k_metric_resolves_any_k_and_validates() -> None:
    metric = get_metric("pass@10")
    items = [metric.item(CodeResult(20, c)) for c in (0, 1, 5, 20)]
    assert metric.score(items).value == pytest.approx(mean([pass_at_k(20, c, 10) for c in (0, 1, 5, 20)]))
    with pytest.raises(MetricError, match="1 <= k <= the 5 samples"):
        get_metric("pass@10").item(CodeResult(5, 1))
    with pytest.raises(MetricError, match="num_correct"):
        CodeResult(3, 4)


def test_mean_stderr_matches_statistics_and_lm_eval() -> None:
    rng = random.Random(4)
    for size in (2, 3, 17, 200):
        values = [rng.random() < 0.6 for _ in range(size)]
        values = [float(v) for v in values]
        expected = statistics.stdev(values) / math.sqrt(size) if len(set(values)) > 1 else 0.0
        assert mean_stderr(values) == pytest.approx(expected, abs=1e-15)
        assert mean_stderr(values) == pytest.approx(lm_metrics.mean_stderr(values), abs=1e-15)
    score = get_metric("acc").score([1.0, 0.0, 1.0, 1.0])
    assert score == Score(value=0.75, stderr=pytest.approx(0.25), n=4)
    assert get_metric("acc").score([1.0]).stderr is None


def test_bootstrap_stderr_is_seeded_and_estimates_the_mean_stderr() -> None:
    rng = random.Random(5)
    values = [rng.gauss(0.0, 1.0) for _ in range(400)]
    first = bootstrap_stderr(mean, values, iters=2000, seed=7)
    assert first == bootstrap_stderr(mean, values, iters=2000, seed=7)
    assert first != bootstrap_stderr(mean, values, iters=2000, seed=8)
    # The bootstrap of the mean estimates sigma / sqrt(n) (without Bessel's correction).
    assert first == pytest.approx(mean_stderr(values), rel=0.1)


def test_bootstrapped_metric_stderr_is_deterministic() -> None:
    results = [RollingResult(-float(i + 1), "word " * (i + 1)) for i in range(30)]
    metric = get_metric("word_perplexity")
    items = [metric.item(r) for r in results]
    a = metric.score(items, bootstrap_iters=200, seed=1)
    assert a.stderr is not None and a.stderr > 0
    assert metric.score(items, bootstrap_iters=200, seed=1) == a
    assert metric.score(items, bootstrap_iters=0).stderr is None


def _member(values: list[float]) -> Score:
    return Score(value=mean(values), stderr=mean_stderr(values), n=len(values))


def test_group_micro_and_macro_match_lm_eval() -> None:
    rng = random.Random(6)
    members = [
        [float(rng.random() < p) for _ in range(size)] for p, size in ((0.3, 10), (0.7, 45), (0.5, 120))
    ]
    scores = [_member(v) for v in members]
    sizes = [s.n for s in scores]
    stderrs = [s.stderr for s in scores]
    values = [s.value for s in scores]

    micro = group_score(scores, "micro")
    assert micro.n == sum(sizes)
    assert micro.value == pytest.approx(lm_metrics.aggregate_subtask_metrics(values, sizes, True))
    assert micro.value == pytest.approx(mean([x for v in members for x in v]))  # the mean over every sample
    assert micro.stderr == pytest.approx(lm_metrics.pooled_sample_stderr(stderrs, sizes))

    macro = group_score(scores, "macro")
    assert macro.value == pytest.approx(lm_metrics.aggregate_subtask_metrics(values, sizes, False))
    assert macro.stderr == pytest.approx(math.sqrt(sum(se**2 for se in stderrs)) / len(stderrs))
    if hasattr(lm_metrics, "unweighted_mean_stderr"):  # lm-eval >= 0.4.10
        assert macro.stderr == pytest.approx(lm_metrics.unweighted_mean_stderr(stderrs))


def test_group_micro_stderr_equals_pooled_stderr_when_members_share_a_mean() -> None:
    members = [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]
    pooled = group_score([_member(v) for v in members], "micro")
    # Equal member means: the pooled variance is the variance of all samples but for the degrees of freedom.
    everything = [x for v in members for x in v]
    expected = math.sqrt(sum((x - 0.5) ** 2 for x in everything) / (len(everything) - 2) / len(everything))
    assert pooled.stderr == pytest.approx(expected)


def test_group_errors() -> None:
    with pytest.raises(MetricError, match="unknown group weighting"):
        group_score([Score(1.0, 0.0, 2)], "median")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="zero samples"):
        group_score([])
    assert group_score([Score(1.0, None, 3), Score(0.0, 0.1, 3)]).stderr is None


def test_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(UnknownMetricError) as info:
        get_metric("acuracy")
    message = str(info.value)
    assert "'acuracy'" in message
    for name in ("acc", "acc_norm", "exact_match", "bleu", "rouge_l", "bits_per_byte", "pass@<k>"):
        assert name in message
    assert info.value.known == metric_names()
    assert isinstance(info.value, LMStackError)  # one except clause catches every lmstack error


def test_registry_directions_and_options() -> None:
    higher = {"acc", "acc_norm", "acc_bytes", "exact_match", "contains", "math_equiv", "bleu", "rouge_l"}
    lower = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"}
    assert set(metric_names()) == higher | lower
    for name in higher:
        assert get_metric(name).higher_is_better
    for name in lower:
        assert not get_metric(name).higher_is_better
    with pytest.raises(MetricError, match=r"no option 'ignore_cas'.*ignore_case"):
        get_metric("exact_match").check_options({"ignore_cas": True})
    with pytest.raises(MetricError, match="scores a ChoiceResult"):
        get_metric("acc_norm").item(CodeResult(1, 1))


def test_register_a_custom_metric() -> None:
    metric = Metric("test_length_ratio", (ChoiceResult,), lambda r: float(len(r.choices)), mean, True)
    register_metric(metric)
    try:
        assert get_metric("test_length_ratio") is metric
        with pytest.raises(MetricError, match="already registered"):
            register_metric(metric)
        with pytest.raises(MetricError, match="reserved"):
            register_metric(Metric("pass@3", (CodeResult,), lambda r: 0.0, mean, True))
    finally:
        from lmstack.eval.metrics import _registry

        del _registry._REGISTRY["test_length_ratio"]
