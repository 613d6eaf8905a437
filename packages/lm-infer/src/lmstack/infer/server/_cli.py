"""``lmstack serve``: serve a model directory over OpenAI's HTTP API.

This module imports neither FastAPI nor uvicorn, so the verb is listed (and explains how to install
the extra) even when they are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from lmstack.infer.tools import TOOL_PARSERS

__all__ = ["register_serve"]

_API_KEY_ENV = "LMSTACK_API_KEY"


def _run_serve(args: argparse.Namespace) -> int:
    missing = [
        name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None
    ]
    if missing:
        print(
            f"error: lmstack serve needs {' and '.join(missing)}: pip install 'lmstack-infer[server]'",
            file=sys.stderr,
        )
        return 2
    from lmstack.infer.server._config import ServerConfig
    from lmstack.infer.server._serve import serve

    keys = list(args.api_key or [])
    if not keys and os.environ.get(_API_KEY_ENV):
        keys = [os.environ[_API_KEY_ENV]]
    config = ServerConfig(
        model_name=args.served_model_name or args.path,
        api_keys=keys,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout,
        tool_call_parser=args.tool_call_parser,
    )
    engine: dict[str, object] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    for name in (
        "max_model_len",
        "kv_cache_memory",
        "block_size",
        "kv_cache_dtype",
        "kernels",
        "weight_layout",
    ):
        value = getattr(args, name)
        if value is not None:
            engine[name] = value
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False

    def ready(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        auth = "API key required" if keys else "no API key"
        print(f"lmstack serve: {config.model_name} on http://{shown}:{port}/v1 ({auth})", flush=True)

    serve(args.path, config, host=args.host, port=args.port, on_ready=ready, dtype=args.dtype,
          device=args.device, **engine)  # fmt: skip
    return 0


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack serve PATH --host ... --port ...``."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a Hugging Face model directory on lmstack's engine with OpenAI's API: "
        "/v1/models, /v1/completions, /v1/chat/completions, plus /health and /metrics. "
        "Needs the server extra: pip install 'lmstack-infer[server]'.",
    )  # fmt: skip
    p.add_argument("path", help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key", action="append", metavar="KEY",
        help=f"accept this key as 'Authorization: Bearer KEY' (repeatable; default: ${_API_KEY_ENV}, "
        "else no auth)",
    )  # fmt: skip
    p.add_argument(
        "--served-model-name", metavar="NAME", help="the model id clients send (default: PATH as given)"
    )
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most requests in flight; more get 429 (default: 256)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds in-flight requests get to finish on SIGTERM (default: 30)")  # fmt: skip
    p.add_argument(
        "--tool-call-parser", choices=sorted(TOOL_PARSERS), metavar="NAME",
        help="how replies to tool_choice 'auto' are searched for tool calls: "
        f"{', '.join(sorted(TOOL_PARSERS))} (default: detected from the chat template, else hermes)",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, help="weight dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1, metavar="N",
        help="run the engine across N processes, the model sharded over them (CUDA: rank r on cuda:r; "
        "default: 1)",
    )  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-model-len", type=int, help="longest sequence (default: the model's)")
    p.add_argument("--kv-cache-memory", help="KV-cache budget, e.g. 4GB (default: sized from max-num-seqs)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default: 16)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks between prompts")
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "float16", "bfloat16", "int8", "int4"),
        help="KV-cache storage; int8/int4 hold ~1.9x/~3.8x the tokens of fp16 (default: auto)",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "triton", "torch"),
        help="Triton kernels or torch (default auto: Triton on CUDA when installed)",
    )
    p.add_argument(
        "--weight-layout",
        choices=("auto", "onednn", "dense", "gemv"),
        help="how CPU weights are stored (default auto: 'gemv', lmstack's one-row kernel, with "
        "--max-num-seqs 1 in float32; oneDNN's packed layout otherwise)",
    )
    p.set_defaults(func=_run_serve)
