"""Evaluate an index on labelled questions: retrieval quality per search mode, and the gate's rejections."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.rag._errors import RAGConfigError
from lmstack.rag._index import SEARCH_MODES, Index
from lmstack.rag.gate import Calibration
from lmstack.rag.retrieve import RetrievalScores, dedupe_sources, score_rankings

__all__ = ["GateScores", "RagEvaluation", "evaluate_index", "read_questions"]

_BASELINE = "gate_baseline"


@dataclass(frozen=True)
class GateScores:
    """How a gate sorted labelled questions; "related" is the positive class.

    Attributes:
        n_related: Related questions scored.
        n_unrelated: Unrelated questions scored.
        precision: Of the questions let through, the share that were related.
        recall: Of the related questions, the share let through.
        f1: Harmonic mean of precision and recall.
        accepted_by_kind: The share let through per question kind (``kind`` of each row).
    """

    n_related: int
    n_unrelated: int
    precision: float
    recall: float
    f1: float
    accepted_by_kind: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The scores as JSON-able data."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class RagEvaluation:
    """Retrieval scores per search mode, and the gate's scores (the model and the one-feature baseline).

    Attributes:
        retrieval: Document-level hit@k, MRR and nDCG@k per mode (``hybrid``, ``dense``, ``bm25``).
        gate: The calibrated gate on the questions, or None without calibration or unrelated questions.
        baseline_gate: The dense-score threshold fitted beside it, on the same questions.
    """

    retrieval: dict[str, RetrievalScores]
    gate: GateScores | None
    baseline_gate: GateScores | None

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able data."""
        return {
            "retrieval": {mode: scores.to_dict() for mode, scores in self.retrieval.items()},
            "gate": None if self.gate is None else self.gate.to_dict(),
            "baseline_gate": None if self.baseline_gate is None else self.baseline_gate.to_dict(),
        }

    def table(self) -> str:
        """Markdown tables of the retrieval and gate scores."""
        first = next(iter(self.retrieval.values()), None)
        lines: list[str] = []
        if first is not None:
            ks = sorted(first.hit)
            head = ["mode", *(f"hit@{k}" for k in ks), "MRR", *(f"nDCG@{k}" for k in sorted(first.ndcg))]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for mode, scores in self.retrieval.items():
                cells = [mode, *(f"{scores.hit[k]:.3f}" for k in ks), f"{scores.mrr:.3f}"]
                cells += [f"{scores.ndcg[k]:.3f}" for k in sorted(scores.ndcg)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append(f"\n{first.n} related questions; document-level ranks.")
        for name, gate in (
            ("gate (calibrated model)", self.gate),
            ("baseline (best dense score)", self.baseline_gate),
        ):
            if gate is not None:
                lines.append(
                    f"{name}: precision {gate.precision:.3f}, recall {gate.recall:.3f}, F1 {gate.f1:.3f} "
                    f"({gate.n_related} related, {gate.n_unrelated} unrelated)"
                )
        return "\n".join(lines)


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Labelled questions from a file.

    JSON Lines rows with ``question`` (and ``relevant``, ``kind``), or plain text with one question per line
    (blank lines and ``#`` comments skipped).

    Raises:
        RAGConfigError: The file is missing, or a row lacks a question.
    """
    path = Path(path)
    if not path.is_file():
        raise RAGConfigError(f"no question file at {path}", field="questions")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or (text.startswith("#") and path.suffix != ".jsonl"):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise RAGConfigError(f"{path}:{number}: not JSON ({error.msg})", field="questions") from error
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise RAGConfigError(f"{path}:{number}: a row needs a 'question' string", field="questions")
            rows.append(row)
        else:
            rows.append({"question": text})
    return rows


def _matches(source: str, relevant: str) -> bool:
    """Whether a source answers for a label: equal to it, or ending in ``/label`` (``a/b.md``, ``b.md``)."""
    return source == relevant or source.endswith("/" + relevant.lstrip("/"))


def _labels(ranked: Sequence[str], relevant: Collection[str]) -> list[str]:
    """Rename each ranked source to the relevance label it matches, so the metrics compare plain strings."""
    return [next((r for r in relevant if _matches(source, r)), source) for source in ranked]


def _gate_scores(
    calibration: Calibration,
    related: Sequence[tuple[str, dict[str, float]]],
    unrelated: Sequence[tuple[str, dict[str, float]]],
) -> GateScores:
    model = calibration.model
    accepted_related = [model.is_relevant(f) for _, f in related]
    accepted_unrelated = [model.is_relevant(f) for _, f in unrelated]
    true_pos = sum(accepted_related)
    accepted = true_pos + sum(accepted_unrelated)
    precision = true_pos / accepted if accepted else 0.0
    recall = true_pos / len(related) if related else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    by_kind: dict[str, list[bool]] = {}
    for (kind, _), ok in zip([*related, *unrelated], [*accepted_related, *accepted_unrelated], strict=True):
        by_kind.setdefault(kind, []).append(ok)
    shares = {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())}
    return GateScores(len(related), len(unrelated), precision, recall, f1, shares)


def evaluate_index(
    index: Index,
    questions: Sequence[Mapping[str, Any]],
    unrelated: Sequence[Mapping[str, Any] | str] = (),
    *,
    ks: Sequence[int] = (1, 3, 5, 10),
    modes: Sequence[str] = SEARCH_MODES,
    use_tqdm: bool | None = None,
) -> RagEvaluation:
    """Score retrieval per mode on related questions, and the stored gate on related and unrelated ones.

    Args:
        index: The index, calibrated if the gate is to be scored.
        questions: Related questions: ``{"question": ..., "relevant": [source, ...], "kind"?: ...}``. A
            relevance
            label matches a source equal to it or ending in ``/label``.
        unrelated: Questions the gate should refuse (rows or strings).
        ks: The cut-offs of hit@k and nDCG@k.
        modes: The search modes to score.
        use_tqdm: Show a progress bar (None: more than 50 questions).

    Returns:
        The scores. The gate is scored with the calibration stored in the index: score it on questions it was
        not calibrated on.
    """
    if not questions:
        raise RAGConfigError("no related questions to evaluate", field="questions")
    unknown = [m for m in modes if m not in SEARCH_MODES]
    if unknown:
        raise RAGConfigError(f"unknown search modes {unknown}: use {', '.join(SEARCH_MODES)}", field="modes")
    depth = max(ks) * 3  # chunks fetched so that enough distinct documents remain after deduplication
    progress = len(questions) + len(unrelated) > 50 if use_tqdm is None else use_tqdm
    rankings: dict[str, list[list[str]]] = {mode: [] for mode in modes}
    relevant_sets: list[set[str]] = []
    related_features: list[tuple[str, dict[str, float]]] = []
    for row in questions:
        relevant = [str(r) for r in row.get("relevant") or []]
        if not relevant:
            raise RAGConfigError(f"question {row['question']!r} has no 'relevant' sources", field="questions")
        relevant_sets.append(set(relevant))
    texts = [row["question"] for row in questions]
    for mode in modes:
        retrievals = index.retrieve_many(texts, depth, mode=mode, use_tqdm=progress)
        for retrieval, relevant_set in zip(retrievals, relevant_sets, strict=True):
            ranked = _labels(dedupe_sources([h.source for h in retrieval.hits]), relevant_set)
            rankings[mode].append(ranked)
        if mode == "hybrid" or (mode == modes[0] and "hybrid" not in modes):
            related_features = [
                (str(row.get("kind", "related")), r.features)
                for row, r in zip(questions, retrievals, strict=True)
            ]
    scores = {mode: score_rankings(rankings[mode], relevant_sets, ks) for mode in modes}
    gate = baseline = None
    calibration = index.calibration
    if unrelated and calibration is not None:
        rows = [{"question": item} if isinstance(item, str) else item for item in unrelated]
        retrievals = index.retrieve_many([row["question"] for row in rows], use_tqdm=progress)
        unrelated_features = [
            (str(row.get("kind", "unrelated")), r.features) for row, r in zip(rows, retrievals, strict=True)
        ]
        gate = _gate_scores(calibration, related_features, unrelated_features)
        stored = index.store.state(_BASELINE)
        if stored:
            baseline = _gate_scores(Calibration.from_dict(stored), related_features, unrelated_features)
    return RagEvaluation(scores, gate, baseline)
