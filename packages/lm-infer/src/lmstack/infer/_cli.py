"""``lmstack generate``: complete prompts with a local model from the command line."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register_generate"]


def _run_generate(args: argparse.Namespace) -> int:
    from lmstack.infer import LLM, SamplingParams

    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts.extend(line.rstrip("\n") for line in f if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"error: cannot read --prompts-file {args.prompts_file}: {reason}", file=sys.stderr)
            return 2
    if not prompts:
        print("error: give at least one --prompt (or --prompts-file)", file=sys.stderr)
        return 2
    llm = LLM(args.path, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
    )
    try:
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
    finally:
        llm.close()  # stops tensor-parallel workers at once
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.json:
            completions = [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                for c in out.outputs
            ]
            record = {"prompt": prompt, "completions": completions}
            print(json.dumps(record, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(f"{prompt}{c.text}" if not args.chat else c.text)
                print(f"[{c.finish_reason}, {len(c.token_ids)} tokens]", file=sys.stderr)
    return 0


def register_generate(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack generate PATH --prompt ...``."""
    p = subparsers.add_parser(
        "generate", help="generate text with a local model",
        description="Complete prompts with a Hugging Face model directory on lmstack's engine.",
    )  # fmt: skip
    p.add_argument("path", help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1,
                   metavar="N", help="shard the model over N processes (default: 1)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=_run_generate)
