"""``lmstack rag``: build, search, calibrate, evaluate and serve a document index.

::

    lmstack rag ingest PATH... --index DIR [--embedder PATH_OR_URL --embed-model NAME] [--chunk-tokens N]
    lmstack rag search QUERY --index DIR [-k 5] [--mode hybrid|dense|bm25] [--filter KEY=VALUE]
    lmstack rag ask QUESTION --index DIR --model PATH_OR_URL [-k 4] [--stream]
    lmstack rag calibrate --index DIR --related FILE --unrelated FILE [--min-precision P]
    lmstack rag eval --index DIR --questions FILE.jsonl [--unrelated FILE] [--output results.json]
    lmstack rag serve --index DIR [--model PATH_OR_URL] [--port 8100] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register_rag"]


def _embedder(args: argparse.Namespace) -> Any:
    from lmstack.rag.embed import load_embedder

    if args.embedder is None:
        return None
    return load_embedder(
        args.embedder,
        model=args.embed_model,
        api_key=args.embed_api_key or os.environ.get("LMSTACK_RAG_EMBED_API_KEY"),
    )


def _open(args: argparse.Namespace) -> Any:
    from lmstack.rag import Index

    return Index.open(args.index, embedder=_embedder(args), reranker=getattr(args, "rerank_model", None))


def _run_ingest(args: argparse.Namespace) -> int:
    from lmstack.rag import ChunkingConfig, Index, VectorIndexConfig

    chunking = ChunkingConfig(chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens)
    vectors = VectorIndexConfig(kind=args.vector_index)
    with Index.open(
        args.index, embedder=_embedder(args), create=True, chunking=chunking, vector_index=vectors
    ) as index:
        if index.chunking != chunking and (args.chunk_tokens_given or args.overlap_tokens_given):
            print(
                f"note: the index keeps the chunking it was created with ({index.chunking})", file=sys.stderr
            )
        report = index.ingest(
            args.paths, include=args.include or (), exclude=args.exclude or (),
            delete_missing=not args.keep_missing, max_bytes=int(args.max_mb * 1_000_000),
            use_tqdm=not args.quiet,
        )  # fmt: skip
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0


def _filters(items: list[str] | None) -> dict[str, Any] | None:
    if not items:
        return None
    filters: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --filter takes KEY=VALUE, not {item!r}")
        parsed: Any = value
        if value.lstrip("-").isdigit():
            parsed = int(value)
        filters.setdefault(key, []).append(parsed)
    return {k: v[0] if len(v) == 1 else v for k, v in filters.items()}


def _run_search(args: argparse.Namespace) -> int:
    with _open(args) as index:
        retrieval = index.retrieve(
            args.query, args.k, mode=args.mode, filters=_filters(args.filter), diversity=args.diversity
        )
    if args.json:
        hits = [
            {"text": h.text, "source": h.source, "score": h.score, "metadata": dict(h.metadata)}
            for h in retrieval.hits
        ]
        print(
            json.dumps(
                {"hits": hits, "relevant": retrieval.relevant, "probability": retrieval.probability}, indent=2
            )
        )
        return 0
    for rank, hit in enumerate(retrieval.hits, start=1):
        where = hit.source + (f" p.{hit.metadata['page']}" if hit.metadata.get("page") else "")
        print(f"{rank}. [{hit.score:.4f}] {where}")
        print("   " + " ".join(hit.text.split())[:300])
    if retrieval.probability is not None:
        verdict = "about the collection" if retrieval.relevant else "NOT about the collection"
        print(f"gate: {verdict} (p = {retrieval.probability:.3f})")
    return 0


def _llm(model: str, api_key: str | None) -> Any:
    if model.startswith(("http://", "https://")):
        from lmstack.infer import RemoteLLM

        return RemoteLLM(model, api_key=api_key)
    from lmstack.infer import LLM

    return LLM(model)


def _run_ask(args: argparse.Namespace) -> int:
    from lmstack.infer import SamplingParams
    from lmstack.rag import Assistant

    llm = _llm(args.model, args.api_key or os.environ.get("LMSTACK_RAG_MODEL_API_KEY"))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    kwargs: dict[str, Any] = {"k": args.k, "sampling_params": params, "use_gate": not args.no_gate}
    if args.instruction:
        kwargs["instruction"] = args.instruction
    if args.max_prompt_tokens:
        kwargs["max_prompt_tokens"] = args.max_prompt_tokens
    with _open(args) as index:
        assistant = Assistant(index, llm, **kwargs)
        if args.stream:
            answer = asyncio.run(_stream(assistant, args.question))
        else:
            answer = assistant.ask(args.question)
            print(answer.text)
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
    else:
        for citation in answer.citations:
            print(f"[{citation.number}] {citation.source}")
    return 0


async def _stream(assistant: Any, question: str) -> Any:
    answer = None
    async for event in assistant.stream(question):
        if event.type == "delta":
            print(event.text, end="", flush=True)
        elif event.type == "done":
            answer = event.answer
    print()
    return answer


def _lines(path: str) -> list[str]:
    from lmstack.rag._evaluate import read_questions

    return [row["question"] for row in read_questions(path)]


def _run_calibrate(args: argparse.Namespace) -> int:
    related, unrelated = _lines(args.related), _lines(args.unrelated)
    with _open(args) as index:
        calibration, baseline = index.calibrate(
            related, unrelated, min_precision=args.min_precision, use_tqdm=not args.quiet
        )
    print(calibration.table())
    chosen, cv = calibration.chosen, calibration.cross_validated
    print(
        f"chosen: threshold {chosen.threshold:.3f}, precision {chosen.precision:.3f}, "
        f"recall {chosen.recall:.3f}, F1 {chosen.f1:.3f} on {calibration.n_related} related / "
        f"{calibration.n_unrelated} unrelated questions"
    )
    print(
        f"cross-validated ({len(related) + len(unrelated)} questions, 5 folds): "
        f"precision {cv.precision:.3f}, recall {cv.recall:.3f}, F1 {cv.f1:.3f}"
    )
    b, bcv = baseline.chosen, baseline.cross_validated
    print(f"baseline, a threshold on the best dense score: F1 {b.f1:.3f} (cross-validated {bcv.f1:.3f})")
    print(f"stored in {args.index}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from lmstack.rag._evaluate import evaluate_index, read_questions

    questions = read_questions(args.questions)
    unrelated = read_questions(args.unrelated) if args.unrelated else []
    ks = tuple(int(k) for k in args.ks.split(","))
    with _open(args) as index:
        result = evaluate_index(index, questions, unrelated, ks=ks, use_tqdm=not args.quiet)
    print(result.table())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"results in {args.output}")
    return 0


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="the index directory")
    p.add_argument(
        "--embedder", help="embedding model directory or http(s)://HOST/v1 server (default: the index's own)"
    )
    p.add_argument("--embed-model", help="model name for an embedding server")
    p.add_argument("--embed-api-key", help="API key for an embedding server (or LMSTACK_RAG_EMBED_API_KEY)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Given(argparse.Action):
    """Store the value and remember that the user gave it."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        setattr(ns, self.dest, values)
        setattr(ns, self.dest + "_given", True)


def register_rag(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack rag`` and its subcommands."""
    rag = subparsers.add_parser(
        "rag", help="document indexes: ingest, search, ask, calibrate, eval, serve",
        description="A FAISS + BM25 index over your documents, a relevance gate, and an assistant that "
        "answers from them with citations.",
    )  # fmt: skip
    sub = rag.add_subparsers(title="subcommands", dest="rag_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("ingest", help="add, update and delete documents (only what changed)")
    p.add_argument(
        "paths", nargs="+", help="files and folders (Markdown, text, HTML, PDF, DOCX, XLSX, CSV, Python)"
    )
    _index_options(p)
    p.add_argument(
        "--chunk-tokens", type=int, default=200, action=_Given, help="tokens per chunk, for a new index"
    )
    p.add_argument(
        "--overlap-tokens",
        type=int,
        default=32,
        action=_Given,
        help="overlap between chunks, for a new index",
    )
    p.add_argument(
        "--vector-index", default="auto", choices=("auto", "flat", "hnsw", "ivfpq"), help="FAISS index kind"
    )
    p.add_argument("--include", action="append", metavar="GLOB", help="only sources matching (repeatable)")
    p.add_argument(
        "--exclude", action="append", metavar="GLOB", help="leave out sources matching (repeatable)"
    )
    p.add_argument("--keep-missing", action="store_true", help="keep documents whose files are gone")
    p.add_argument("--max-mb", type=float, default=50.0, help="skip files larger than this (default 50 MB)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_ingest, chunk_tokens_given=False, overlap_tokens_given=False)

    p = sub.add_parser("search", help="search the index")
    p.add_argument("query")
    _index_options(p)
    p.add_argument("-k", type=int, default=5, help="hits to show (default 5)")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "dense", "bm25"))
    p.add_argument(
        "--filter", action="append", metavar="KEY=VALUE", help="metadata filter, e.g. source=docs/*.md"
    )
    p.add_argument("--rerank-model", help="a local cross-encoder directory to rerank with")
    p.add_argument("--diversity", type=float, help="MMR trade-off in (0, 1] (lower: more diverse)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_search)

    p = sub.add_parser("ask", help="answer a question from the index with a model")
    p.add_argument("question")
    _index_options(p)
    p.add_argument(
        "--model", required=True, help="a model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--api-key", help="API key for a model server (or LMSTACK_RAG_MODEL_API_KEY)")
    p.add_argument("-k", type=int, default=4, help="passages in the prompt (default 4)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-prompt-tokens", type=int, help="drop passages until the prompt fits")
    p.add_argument("--instruction", help="the instruction line that opens the prompt")
    p.add_argument("--no-gate", action="store_true", help="answer even questions the gate finds unrelated")
    p.add_argument("--rerank-model", help="a local cross-encoder directory to rerank with")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_ask)

    p = sub.add_parser("calibrate", help="fit the relevance gate on labelled questions and store it")
    _index_options(p)
    p.add_argument("--related", required=True, help="questions about the documents, one per line (or .jsonl)")
    p.add_argument(
        "--unrelated", required=True, help="questions and chatter to refuse, one per line (or .jsonl)"
    )
    p.add_argument(
        "--min-precision", type=float, help="most permissive threshold with at least this precision"
    )
    p.set_defaults(func=_run_calibrate)

    p = sub.add_parser(
        "eval", help="retrieval hit@k / MRR / nDCG per mode and the gate's precision / recall / F1"
    )
    _index_options(p)
    p.add_argument("--questions", required=True, help="JSONL rows {question, relevant: [source...]}")
    p.add_argument("--unrelated", help="questions the gate should refuse (one per line or .jsonl)")
    p.add_argument("--ks", default="1,3,5,10", help="cut-offs (default 1,3,5,10)")
    p.add_argument("--output", help="write the scores as JSON here")
    p.set_defaults(func=_run_eval)

    from lmstack.rag.server import register_serve

    register_serve(sub)
