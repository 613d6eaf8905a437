"""lmstack-rag on the labelled sets (examples/rag): the gate and hybrid retrieval against their baselines.

The world set runs on a small generated world (the quickstart preset, 40 articles); the project set on
this repository's own docs. Gates are fitted on the `calibrate` halves and scored on the `test` halves.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmstack.rag import Index, evaluate_index

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "world"))
sys.path.insert(0, str(REPO / "examples" / "rag"))
import labelled  # noqa: E402
import world  # noqa: E402

HUIXIANGDOU_F1 = 0.754  # its best reported rejection F1 (a dense-score threshold)


@pytest.fixture(scope="module")
def world_eval(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rag-world")
    world_dir = root / "world"
    world.generate(world_dir, seed=0, **dataclasses.asdict(world.PRESETS["quickstart"]))
    labelled.write_world_documents(world_dir, root / "world_docs")
    splits = labelled.world_questions(world_dir)
    index = Index.create(root / "index")
    index.ingest(root / "world_docs", use_tqdm=False)
    related = [row["question"] for row in splits["related_calibrate"]]
    unrelated = [row["question"] for row in splits["unrelated_calibrate"]]
    index.calibrate(related, unrelated, use_tqdm=False)
    questions = [{**row, "relevant": row["sources"]} for row in splits["related_test"]]
    result = evaluate_index(index, questions, splits["unrelated_test"], use_tqdm=False)
    index.close()
    return result


def test_world_gate_beats_the_dense_threshold_and_huixiangdou(world_eval) -> None:
    gate, baseline = world_eval.gate, world_eval.baseline_gate
    assert gate is not None and baseline is not None
    assert gate.f1 > max(baseline.f1, HUIXIANGDOU_F1), (gate, baseline)
    # Questions about names the world does not have, in the world's own wording, are refused.
    assert gate.accepted_by_kind["unknown_entity"] < 0.1
    assert gate.accepted_by_kind["offtopic"] < 0.05


def test_world_retrieval_finds_the_article(world_eval) -> None:
    hybrid = world_eval.retrieval["hybrid"]
    assert hybrid.hit[5] > 0.95 and hybrid.mrr > 0.9


def test_project_docs_hybrid_beats_dense_and_bm25(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # project sources are repository-relative paths
    splits = labelled.project_questions(REPO)
    index = Index.create(tmp_path / "index")
    index.ingest([p.relative_to(REPO) for p in labelled.project_documents(REPO)], use_tqdm=False)
    rows = [
        {**row, "relevant": row["sources"]} for row in splits["related_calibrate"] + splits["related_test"]
    ]
    result = evaluate_index(index, rows, use_tqdm=False)
    index.close()
    mrr = {mode: scores.mrr for mode, scores in result.retrieval.items()}
    assert mrr["hybrid"] > mrr["dense"] and mrr["hybrid"] > mrr["bm25"], mrr
