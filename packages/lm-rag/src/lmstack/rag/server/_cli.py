"""``lmstack rag serve``: serve an index over HTTP (search, answers, ingestion, embeddings, chat webhooks).

This module imports neither FastAPI nor uvicorn, so the verb is listed (and says how to install the extra)
even when they are missing.

Secrets can come from the environment instead of the command line (where other users of the machine could
read them in the process list); a flag given on the command line wins:

========================================  ==========================================
``LMSTACK_RAG_API_KEY``                   ``--api-key`` (several keys: comma-separated)
``LMSTACK_RAG_MODEL_API_KEY``             ``--model-api-key``
``LMSTACK_RAG_WEBHOOK_SECRET``            ``--webhook-secret``
``LMSTACK_RAG_FEISHU_VERIFICATION_TOKEN`` ``--feishu-verification-token``
``LMSTACK_RAG_FEISHU_ENCRYPT_KEY``        ``--feishu-encrypt-key``
``LMSTACK_RAG_FEISHU_APP_ID``             ``--feishu-app-id``
``LMSTACK_RAG_FEISHU_APP_SECRET``         ``--feishu-app-secret``
========================================  ==========================================
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

__all__ = ["ENV_VARS", "register_serve"]

ENV_VARS = {
    "api_key": "LMSTACK_RAG_API_KEY",
    "model_api_key": "LMSTACK_RAG_MODEL_API_KEY",
    "webhook_secret": "LMSTACK_RAG_WEBHOOK_SECRET",
    "feishu_verification_token": "LMSTACK_RAG_FEISHU_VERIFICATION_TOKEN",
    "feishu_encrypt_key": "LMSTACK_RAG_FEISHU_ENCRYPT_KEY",
    "feishu_app_id": "LMSTACK_RAG_FEISHU_APP_ID",
    "feishu_app_secret": "LMSTACK_RAG_FEISHU_APP_SECRET",
}
"""The environment variable each secret option falls back to."""

_LEVELS = ("debug", "info", "warning", "error")


def _secret(args: argparse.Namespace, name: str) -> str | None:
    value = getattr(args, name)
    return value if value is not None else os.environ.get(ENV_VARS[name]) or None


def _run_serve(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        print(
            f"error: lmstack rag serve needs {', '.join(missing)}: pip install 'lmstack-rag[server]'",
            file=sys.stderr,
        )
        return 2
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)

    from lmstack.rag.server._config import RagServerConfig
    from lmstack.rag.server._serve import serve

    keys = list(args.api_key or [])
    if not keys and os.environ.get(ENV_VARS["api_key"]):
        keys = [key.strip() for key in os.environ[ENV_VARS["api_key"]].split(",") if key.strip()]
    config = RagServerConfig(
        api_keys=keys,
        webhook_secret=_secret(args, "webhook_secret"),
        feishu_verification_token=_secret(args, "feishu_verification_token"),
        feishu_encrypt_key=_secret(args, "feishu_encrypt_key"),
        feishu_api_base=args.feishu_api_base,
        feishu_app_id=_secret(args, "feishu_app_id"),
        feishu_app_secret=_secret(args, "feishu_app_secret"),
        ingest_roots=list(args.ingest_root or []),
        ingest_enabled=not args.no_ingest,
        max_upload_bytes=args.max_upload_bytes,
        group_chat_silent=not args.answer_unrelated_in_groups,
    )

    def ready(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        auth = "API key required" if keys else "no API key"
        answers = f"answers with {args.model}" if args.model else "no model: search only"
        print(f"lmstack rag serve: {args.index} on http://{shown}:{port} ({auth}; {answers})", flush=True)

    options = {"device": args.device} if args.device else {}
    serve(
        args.index,
        model=args.model,
        host=args.host,
        port=args.port,
        config=config,
        api_key_for_model=_secret(args, "model_api_key"),
        k=args.k,
        on_ready=ready,
        **options,
    )
    return 0


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``lmstack rag`` subcommands."""
    p = subparsers.add_parser(
        "serve",
        help="serve an index over HTTP: search, answers, ingestion, embeddings, chat webhooks",
        description="Serve a lmstack-rag index: POST /search, /query (JSON or server-sent events), /ingest, "
        "OpenAI's /v1/embeddings and /v1/models, a signed group-chat /webhook and Feishu/Lark "
        "/feishu/events. "
        "Secrets may come from the environment: " + ", ".join(f"{v}" for v in ENV_VARS.values()) + ". "
        "Needs the server extra: pip install 'lmstack-rag[server]'.",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    p.add_argument(
        "--model",
        metavar="PATH_OR_URL",
        help="what answers: a local model directory or an OpenAI-compatible server's URL "
        "(default: none, /query and the chat webhooks are off)",
    )
    p.add_argument(
        "--model-api-key",
        metavar="KEY",
        help=f"the model server's API key (default: ${ENV_VARS['model_api_key']})",
    )
    p.add_argument("--device", help="device of a local model, e.g. cuda (default: the LLM's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port (default: 8100; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help=f"accept 'Authorization: Bearer KEY' (repeatable; default: ${ENV_VARS['api_key']}, else none)",
    )
    p.add_argument(
        "--webhook-secret",
        metavar="S",
        help=f"turn on POST /webhook, signed with this secret (default: ${ENV_VARS['webhook_secret']})",
    )
    p.add_argument(
        "--feishu-verification-token", metavar="T", help="turn on POST /feishu/events with this token"
    )
    p.add_argument(
        "--feishu-encrypt-key",
        metavar="K",
        help="the Feishu app's encrypt key (signatures, encrypted events)",
    )
    p.add_argument("--feishu-app-id", metavar="ID", help="the Feishu app id (to post replies)")
    p.add_argument("--feishu-app-secret", metavar="S", help="the Feishu app secret (to post replies)")
    p.add_argument(
        "--feishu-api-base",
        default="https://open.feishu.cn/open-apis",
        metavar="URL",
        help="Feishu's open API (Lark: https://open.larksuite.com/open-apis)",
    )
    p.add_argument(
        "--answer-unrelated-in-groups",
        action="store_true",
        help="refuse unrelated group-chat messages out loud (default: stay silent)",
    )
    p.add_argument(
        "--ingest-root",
        action="append",
        metavar="DIR",
        help="a folder POST /ingest may read by path (repeatable; default: uploads only)",
    )
    p.add_argument("--no-ingest", action="store_true", help="turn POST /ingest off")
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=50_000_000,
        metavar="N",
        help="largest upload (default: 50 MB)",
    )
    p.add_argument("--k", type=int, default=4, help="passages per answer (default: 4)")
    p.add_argument("--log-level", default="info", choices=_LEVELS, help="log level (default: info)")
    p.set_defaults(func=_run_serve)
