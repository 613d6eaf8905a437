"""Evaluate lmstack-rag on the labelled sets: retrieval per search mode, and the relevance gate.

For each collection — the bundled world's articles (300 entities by default) and this repository's own
docs — it builds an index with the default embedder, calibrates the gate on the `calibrate` halves of
the labelled questions, and scores the `test` halves:

* retrieval: document-level hit@1/3/5/10, MRR and nDCG@1/3/5/10 of dense, BM25 and hybrid search;
* the gate: rejection precision, recall and F1 of the calibrated model and, fitted on the same
  questions, of the one-feature baseline (a threshold on the best dense score), plus the share of each
  question kind let through.

    python examples/rag/evaluate.py --out out/rag            # ~2 minutes on 2 cores
    python examples/rag/evaluate.py --out out/rag --entities 40

Writes OUT/<collection>/results.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmstack.rag import Index, evaluate_index

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "world"))
sys.path.insert(0, str(REPO / "examples" / "rag"))
import labelled  # noqa: E402
import world  # noqa: E402


def run(name: str, index_dir: Path, paths: list[Path], splits: dict[str, list[dict]], out: Path) -> dict:
    start = time.perf_counter()
    index = Index.open(index_dir, create=True)
    report = index.ingest(paths, use_tqdm=False)
    print(f"\n## {name}\n\nindex: {len(index.documents())} documents, {len(index)} chunks "
          f"({report.chunks_added} written now, {time.perf_counter() - start:.1f} s)")  # fmt: skip
    related = [row["question"] for row in splits["related_calibrate"]]
    unrelated = [row["question"] for row in splits["unrelated_calibrate"]]
    calibration, baseline = index.calibrate(related, unrelated, use_tqdm=False)
    cv = calibration.cross_validated
    print(
        f"gate calibrated on {len(related)} related / {len(unrelated)} unrelated questions: "
        f"F1 {calibration.chosen.f1:.3f} (5-fold cross-validated {cv.f1:.3f}); "
        f"baseline F1 {baseline.chosen.f1:.3f} (cross-validated {baseline.cross_validated.f1:.3f})"
    )
    questions = [{**row, "relevant": row["sources"]} for row in splits["related_test"]]
    result = evaluate_index(index, questions, splits["unrelated_test"], use_tqdm=False)
    print(f"\ntest halves: {len(questions)} related, {len(splits['unrelated_test'])} unrelated questions\n")
    print(result.table())
    for label, gate in (("model", result.gate), ("baseline", result.baseline_gate)):
        if gate is not None:
            shares = ", ".join(f"{kind} {share:.0%}" for kind, share in gate.accepted_by_kind.items())
            print(f"let through by the {label}: {shares}")
    by_kind: dict[str, list[dict]] = {}
    for row in questions:
        by_kind.setdefault(row["kind"], []).append(row)
    if len(by_kind) > 1:
        print("\nhit@5 / MRR per question kind:")
        for kind, rows in sorted(by_kind.items()):
            part = evaluate_index(index, rows, use_tqdm=False).retrieval
            cells = ", ".join(f"{mode} {s.hit[5]:.3f} / {s.mrr:.3f}" for mode, s in part.items())
            print(f"  {kind} ({len(rows)}): {cells}")
    index.close()
    data = {"collection": name, "calibration": calibration.to_dict(), "baseline": baseline.to_dict(),
            "test": result.to_dict()}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "rag")
    parser.add_argument(
        "--entities", type=int, default=300, help="entities of the generated world (default 300)"
    )
    parser.add_argument("--only", choices=("world", "project"), help="evaluate one collection")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.only != "project":
        world_dir = out / f"world-{args.entities}"
        world.generate(world_dir, seed=0, num_entities=args.entities)
        docs = out / "labels" / "world_docs"
        labelled.write_world_documents(world_dir, docs)
        run("world articles", out / "index-world", [docs], labelled.world_questions(world_dir), out / "world")
    if args.only != "world":
        os.chdir(REPO)  # project sources are repository-relative paths
        documents = [p.relative_to(REPO) for p in labelled.project_documents(REPO)]
        run(
            "project docs",
            out / "index-project",
            documents,
            labelled.project_questions(REPO),
            out / "project",
        )


if __name__ == "__main__":
    main()
