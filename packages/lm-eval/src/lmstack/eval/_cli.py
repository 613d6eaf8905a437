"""``lmstack eval``: evaluate a model on tasks; ``lmstack eval merge`` / ``rescore`` / ``compare``.

::

    lmstack eval --model PATH_OR_URL --tasks NAME_OR_YAML[,...] --output DIR [--batch-size N]
                 [--num-fewshot K] [--limit N] [--shard i/n]
    lmstack eval merge CACHE... --into CACHE
    lmstack eval rescore --cache CACHE --tasks ... --output DIR
    lmstack eval compare RUN_DIR... [--plot PNG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register_eval"]


def _task_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``evaluate`` and ``rescore`` share."""
    return {
        "output_dir": args.output,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "data_dir": args.data_dir,
    }


def _run_eval(args: argparse.Namespace) -> int:
    if not args.model or not args.tasks:
        print("error: lmstack eval needs --model and --tasks (or a subcommand: merge, rescore, compare)",
              file=sys.stderr)  # fmt: skip
        return 2
    from lmstack.eval._api import evaluate

    model: object = args.model
    if args.model.startswith(("http://", "https://")) and (args.tokenizer or args.api_key):
        from lmstack.infer import RemoteLLM

        model = RemoteLLM(args.model, api_key=args.api_key, tokenizer=args.tokenizer)
    result = evaluate(
        model,
        args.tasks,
        batch_size=args.batch_size,
        shard=args.shard,
        cache=args.cache or "auto",
        max_length=args.max_length,
        **_task_kwargs(args),
    )
    hits, misses = result.cache.hits, result.cache.misses
    if args.shard:
        print(f"shard {args.shard}: {misses} calls computed, {hits} cached, in {result.cache_path}")
        return 0
    print(result.table())
    if args.output:
        print(f"results in {Path(args.output) / 'results.json'}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from lmstack.eval.runner import merge_caches

    added = merge_caches(args.caches, args.into)
    print(f"merged {len(args.caches)} caches into {args.into}: {added} answers added")
    return 0


def _run_rescore(args: argparse.Namespace) -> int:
    from lmstack.eval._api import rescore

    result = rescore(args.tasks, args.cache, fingerprint=args.fingerprint, **_task_kwargs(args))
    print(result.table())
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from lmstack.eval.report import compare_runs

    print(compare_runs(args.run_dirs, plot=args.plot))
    return 0


def _task_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--tasks", required=required, help="task names or task YAML files, comma-separated")
    parser.add_argument(
        "--num-fewshot", type=int, help="few-shot examples per document (overrides the tasks)"
    )
    parser.add_argument("--limit", type=int, help="evaluate each task's first N documents")
    parser.add_argument("--data-dir", help="where built-in tasks find their data")


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack eval`` and its ``merge``, ``rescore`` and ``compare`` subcommands."""
    p = subparsers.add_parser(
        "eval", help="evaluate a model on tasks",
        description="Evaluate a model directory or an OpenAI-compatible server on tasks; every answer is "
        "cached (a killed run resumes where it stopped).",
    )  # fmt: skip
    p.add_argument("--model", help="a model directory or an http(s) URL of an OpenAI-compatible server")
    _task_options(p, required=False)
    p.add_argument("--output", help="directory for results.json, results.md, samples/ and the cache")
    p.add_argument("--batch-size", type=int, help="calls per model invocation and cache commit (default 64)")
    p.add_argument("--shard", help="i/n: compute shard i (from 0) of n into its own cache; score nothing")
    p.add_argument("--cache", help="the SQLite cache file (default: OUTPUT/cache.sqlite)")
    p.add_argument("--max-length", type=int, help="window of rolling log-likelihoods (default: the model's)")
    p.add_argument("--tokenizer", help="tokenizer directory for a server URL (rolling and chat scoring)")
    p.add_argument("--api-key", help="API key for a server URL")
    p.set_defaults(func=_run_eval)
    sub = p.add_subparsers(title="subcommands", dest="eval_command", metavar="SUBCOMMAND")

    merge = sub.add_parser("merge", help="join shard caches", description="Join shard caches into one.")
    merge.add_argument("caches", nargs="+", help="cache files to read")
    merge.add_argument("--into", required=True, help="the cache file to add them to")
    merge.set_defaults(func=_run_merge)

    again = sub.add_parser("rescore", help="score again from a cache, without the model",
                           description="Score tasks from a run's cache alone.")  # fmt: skip
    again.add_argument("--cache", required=True, help="the run's cache file")
    _task_options(again, required=True)
    again.add_argument("--output", help="directory for the results")
    again.add_argument("--fingerprint", help="which model's answers (when the cache holds several)")
    again.set_defaults(func=_run_rescore)

    compare = sub.add_parser("compare", help="compare runs side by side",
                             description="A table of models x tasks from runs' results.json.")  # fmt: skip
    compare.add_argument("run_dirs", nargs="+", help="run output directories")
    compare.add_argument("--plot", help="also write a bar chart PNG here")
    compare.set_defaults(func=_run_compare)
