"""Reference-overlap metrics for generated text: corpus BLEU (as sacrebleu) and ROUGE-L (as rouge-score).

BLEU is corpus-level: each sample contributes its sufficient statistics (hypothesis length, closest
reference length, matched and total n-gram counts for n = 1..4) and the aggregate sums them before
computing one score, exactly as ``sacrebleu.corpus_bleu`` does with its defaults (the ``13a``
tokenizer, exponential smoothing, case-sensitive). Keeping statistics per sample is also what makes
a bootstrap standard error cheap.

ROUGE-L is per sample: the F-measure of the longest common subsequence of tokens, tokenised as
rouge-score does without stemming (lower-cased, runs of characters other than ``a-z0-9`` split
tokens), the best over the references; the aggregate is the mean.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from lmstack.eval.metrics._errors import MetricError
from lmstack.eval.metrics._text import GenerationResult

__all__ = ["bleu_corpus", "bleu_stats", "rouge_l", "rouge_l_fmeasure", "tokenize_13a"]

_MAX_ORDER = 4

# mteval-v13a's rules: split off most ASCII symbols, periods and commas unless between digits, and a
# dash after a digit.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_HTML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> list[str]:
    """Tokenise a segment with the WMT ``13a`` rules (sacrebleu's default BLEU tokenizer).

    Args:
        line: One segment.

    Returns:
        Its tokens.
    """
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _HTML_ENTITIES:
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, _MAX_ORDER + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def bleu_stats(result: GenerationResult) -> tuple[int, ...]:
    """One sample's BLEU sufficient statistics.

    Args:
        result: The hypothesis and its references.

    Returns:
        ``(hyp_len, ref_len, correct_1..4, total_1..4)``; ``ref_len`` is the closest reference length
        (the shorter on a tie).
    """
    hyp = tokenize_13a(result.prediction)
    hyp_counts = _ngrams(hyp)
    ref_counts: Counter[tuple[str, ...]] = Counter()
    ref_lens = []
    for reference in result.references:
        tokens = tokenize_13a(reference)
        ref_lens.append(len(tokens))
        ref_counts |= _ngrams(tokens)  # the max count over references clips each n-gram
    ref_len = min(ref_lens, key=lambda n: (abs(n - len(hyp)), n))
    correct = [0] * _MAX_ORDER
    total = [0] * _MAX_ORDER
    for gram, count in hyp_counts.items():
        total[len(gram) - 1] += count
        correct[len(gram) - 1] += min(count, ref_counts[gram])
    return (len(hyp), ref_len, *correct, *total)


def bleu_corpus(stats: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU (0-100) from per-sample statistics (:func:`bleu_stats`).

    Args:
        stats: One statistics tuple per sample.

    Returns:
        The BLEU score, as ``sacrebleu.corpus_bleu(...).score``.

    Raises:
        MetricError: no samples or malformed statistics.
    """
    if not stats:
        raise MetricError("cannot compute BLEU over zero samples")
    if any(len(s) != 2 + 2 * _MAX_ORDER for s in stats):
        raise MetricError(f"BLEU statistics must have {2 + 2 * _MAX_ORDER} entries per sample")
    sums = [sum(column) for column in zip(*stats, strict=True)]
    sys_len, ref_len = sums[0], sums[1]
    correct, total = sums[2 : 2 + _MAX_ORDER], sums[2 + _MAX_ORDER :]
    if not any(correct):
        return 0.0
    brevity = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    log_precisions = []
    smoothing = 1.0
    for n in range(_MAX_ORDER):
        if total[n] == 0:
            # No hypothesis is long enough for this order: sacrebleu counts its precision as 0.
            log_precisions.extend([-9999999999.0] * (_MAX_ORDER - n))
            break
        if correct[n] == 0:
            smoothing *= 2  # mteval's "exp" smoothing: 1 / (2^k * total) for the k-th empty order
            log_precisions.append(math.log(100.0 / (smoothing * total[n])))
        else:
            log_precisions.append(math.log(100.0 * correct[n] / total[n]))
    return brevity * math.exp(sum(log_precisions) / _MAX_ORDER)


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_fmeasure(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure between one prediction and one reference (rouge-score's ``rougeL``).

    Args:
        prediction: The generated text.
        reference: The reference text.

    Returns:
        The F-measure in [0, 1]; 0 when either side has no tokens.
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(result: GenerationResult) -> float:
    """The best ROUGE-L F-measure of the prediction over its references.

    Args:
        result: The prediction and its references.

    Returns:
        The per-sample ROUGE-L F-measure in [0, 1].
    """
    return max(rouge_l_fmeasure(result.prediction, r) for r in result.references)
