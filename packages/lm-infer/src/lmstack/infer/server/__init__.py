"""lmstack.infer.server: an OpenAI-compatible HTTP server over :class:`~lmstack.infer.LLM`.

Needs the ``server`` extra (``pip install 'lmstack-infer[server]'``: FastAPI and uvicorn).

* :func:`create_app`: the ASGI application (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/health``, ``/metrics``) over an ``LLM``.
* :func:`serve`: load a model and run the application with uvicorn (what ``lmstack serve`` does).
* :class:`ServerConfig`: the served model's name, API keys, load limits and tool-call parser.

Both generation endpoints take structured-output constraints (``response_format`` JSON modes and
vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``), and chat takes
``tools``, ``tool_choice`` and ``parallel_tool_calls``, answering with OpenAI's ``tool_calls``
(streamed as ``tool_calls`` deltas).

``ServerConfig`` imports without the extra; ``create_app`` and ``serve`` are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmstack.infer.server._config import ServerConfig

if TYPE_CHECKING:
    from lmstack.infer.server._api_server import create_app
    from lmstack.infer.server._serve import serve

__all__ = ["ServerConfig", "create_app", "serve"]

_LAZY = {"create_app": "lmstack.infer.server._api_server", "serve": "lmstack.infer.server._serve"}
_EXTRA = {"fastapi", "starlette", "uvicorn", "pydantic", "anyio", "prometheus_client"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name])
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _EXTRA:
            raise ImportError(
                f"lmstack.infer.server.{name} needs the server extra ({exc.name} is not installed): "
                "pip install 'lmstack-infer[server]'"
            ) from exc
        raise
    return getattr(module, name)
