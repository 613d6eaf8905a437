"""``lmstack rag serve``: an index over HTTP, the serving side of a HuixiangDou-style group-chat assistant.

* :func:`create_app`: the FastAPI application (search, answers as JSON or server-sent events, ingestion,
  OpenAI-compatible embeddings, a signed generic chat webhook and Feishu/Lark event callbacks).
* :func:`serve`: run it with uvicorn until SIGINT/SIGTERM; :func:`running`: in a background thread.
* :class:`RagServerConfig`: API keys, chat-platform secrets and ingestion limits.
* :func:`register_serve`: adds ``serve`` to the ``lmstack rag`` command.

The application needs the ``server`` extra (``pip install 'lmstack-rag[server]'``); :class:`RagServerConfig`
and :func:`register_serve` import without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmstack.rag.server._cli import ENV_VARS, register_serve
from lmstack.rag.server._config import RagServerConfig

if TYPE_CHECKING:
    from lmstack.rag.server._app import create_app
    from lmstack.rag.server._serve import load_llm, running, serve

__all__ = ["ENV_VARS", "RagServerConfig", "create_app", "load_llm", "register_serve", "running", "serve"]

_LAZY = {"create_app": "_app", "load_llm": "_serve", "running": "_serve", "serve": "_serve"}


def __getattr__(name: str) -> Any:
    # FastAPI and uvicorn load only when the application is asked for
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"lmstack.rag.server.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
