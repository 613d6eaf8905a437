"""Corpus BLEU against sacrebleu and ROUGE-L against rouge-score, on several sentences."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmstack.eval.metrics import GenerationResult, get_metric
from lmstack.eval.metrics._overlap import bleu_corpus, bleu_stats, rouge_l, tokenize_13a

HYPOTHESES = [
    "The cat sat on the mat.",
    "It is a guide to action which ensures that the military always obeys the commands of the party.",
    "He paid $1,250.50 on 2024-03-01, didn't he?",
    "Tokyo is the capital of Japan",
    "a b c",
    "Résumé of the naïve café owner &amp; friends",
    "",
    "completely unrelated words here",
]
REFERENCES_1 = [
    "The cat is on the mat.",
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "He paid $1,250.50 on 2024-03-01, did he not?",
    "The capital of Japan is Tokyo.",
    "a b c d e",
    "Résumé of the naive café owner & friends",
    "Nothing was said.",
    "The weather is fine today.",
]
REFERENCES_2 = [
    "There is a cat on the mat.",
    "It is the guiding principle which guarantees the military forces always being under the command of the "
    "Party.",
    "Did he pay $1,250.50 on 2024-03-01?",
    "Tokyo is Japan's capital.",
    "a b",
    "The naïve café owner's résumé",
    "",
    "Unrelated words, completely.",
]


def _ours(hyps: list[str], refs: list[list[str]]) -> float:
    return bleu_corpus([bleu_stats(GenerationResult(h, r)) for h, r in zip(hyps, refs, strict=True)])


def test_tokenize_13a_matches_sacrebleu() -> None:
    tokenizer = sacrebleu.BLEU().tokenizer
    for line in (
        HYPOTHESES + REFERENCES_1 + REFERENCES_2 + ["x-\ny", "3.14, 2,5 and 1-2 <skipped> &quot;q&quot;"]
    ):
        assert " ".join(tokenize_13a(line)) == tokenizer(line.rstrip()), line


def test_corpus_bleu_matches_sacrebleu_single_reference() -> None:
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES_1]).score
    assert _ours(HYPOTHESES, [[r] for r in REFERENCES_1]) == pytest.approx(expected, rel=1e-12)


def test_corpus_bleu_matches_sacrebleu_two_references() -> None:
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES_1, REFERENCES_2]).score
    got = _ours(HYPOTHESES, [[a, b] for a, b in zip(REFERENCES_1, REFERENCES_2, strict=True)])
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_corpus_bleu_matches_sacrebleu_on_prefixes(count: int) -> None:
    # Short corpora exercise smoothing (empty n-gram orders) and the brevity penalty.
    hyps, refs = HYPOTHESES[-count:], REFERENCES_1[-count:]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert _ours(hyps, [[r] for r in refs]) == pytest.approx(expected, rel=1e-12)
    for hyp, ref in zip(hyps, refs, strict=True):
        single = sacrebleu.corpus_bleu([hyp], [[ref]]).score
        assert _ours([hyp], [[ref]]) == pytest.approx(single, rel=1e-12, abs=1e-12), (hyp, ref)


def test_bleu_metric_aggregates_statistics_with_a_seeded_bootstrap() -> None:
    metric = get_metric("bleu")
    items = [metric.item(GenerationResult(h, [r])) for h, r in zip(HYPOTHESES, REFERENCES_1, strict=True)]
    score = metric.score(items, bootstrap_iters=100, seed=3)
    assert score.value == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES_1]).score)
    assert score.stderr is not None and score.stderr > 0
    assert metric.score(items, bootstrap_iters=100, seed=3) == score
    assert metric.higher_is_better


def test_rouge_l_matches_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(HYPOTHESES, REFERENCES_1, strict=True)) + list(
        zip(HYPOTHESES, REFERENCES_2, strict=True)
    )
    pairs += [
        ("日本語だけ", "日本語だけ"),
        ("A-B-C", "a b c"),
        ("police killed the gunman", "the gunman killed police"),
    ]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(GenerationResult(prediction, [reference])) == pytest.approx(expected, abs=1e-12), (
            prediction,
            reference,
        )


def test_rouge_l_metric_takes_the_best_reference_and_averages() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    metric = get_metric("rouge_l")
    items = []
    expected = []
    for hyp, a, b in zip(HYPOTHESES, REFERENCES_1, REFERENCES_2, strict=True):
        items.append(metric.item(GenerationResult(hyp, [a, b])))
        expected.append(max(scorer.score(a, hyp)["rougeL"].fmeasure, scorer.score(b, hyp)["rougeL"].fmeasure))
    assert items == pytest.approx(expected, abs=1e-12)
    assert metric.score(items).value == pytest.approx(sum(expected) / len(expected))
