"""The server's settings (independent of FastAPI, so the CLI can build them without the extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmstack.core import ConfigError
from lmstack.infer.tools import TOOL_PARSERS

__all__ = ["ServerConfig"]


@dataclass
class ServerConfig:
    """How the OpenAI-compatible server names its model, checks keys and bounds its load.

    Attributes:
        model_name: The model id clients must send as ``model`` (and ``GET /v1/models`` lists).
        api_keys: Keys accepted as ``Authorization: Bearer KEY`` on ``/v1/*``; empty: no auth.
            ``/health`` and ``/metrics`` stay open.
        max_queue: Most generation requests in flight (admitted and not yet answered, streaming or
            not); one more is refused with 429 at once, so load beyond it costs no memory.
        max_body_bytes: Largest request body accepted; a larger one is refused with 413.
        shutdown_timeout: Seconds that in-flight requests get to finish on shutdown before they are
            ended with an error.
        tool_call_parser: How chat replies with ``tool_choice: "auto"`` are searched for tool calls:
            a name of :data:`lmstack.infer.tools.TOOL_PARSERS` (``hermes``, ``internlm2``,
            ``llama3_json``, ``mistral``). Default: the served ``LLM``'s own setting, else detected
            from the chat template, else hermes.
    """

    model_name: str = "lmstack"
    api_keys: Sequence[str] = ()
    max_queue: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError("ServerConfig.model_name must be a non-empty string.", field="model_name")
        if isinstance(self.api_keys, str):  # a lone key would otherwise be taken letter by letter
            self.api_keys = (self.api_keys,)
        self.api_keys = tuple(self.api_keys)
        if not all(isinstance(key, str) and key for key in self.api_keys):
            raise ConfigError("ServerConfig.api_keys must be non-empty strings.", field="api_keys")
        for name in ("max_queue", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"ServerConfig.{name} must be a positive integer, got {value!r}.", field=name
                )
        timeout = self.shutdown_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise ConfigError(
                f"ServerConfig.shutdown_timeout must be a number, got {timeout!r}.", field="shutdown_timeout"
            )
        if timeout < 0:
            raise ConfigError(
                f"ServerConfig.shutdown_timeout must be >= 0, got {timeout!r}.", field="shutdown_timeout"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ConfigError(
                f"ServerConfig.tool_call_parser must be one of {', '.join(sorted(TOOL_PARSERS))} (or None to "
                f"detect it from the chat template), got {self.tool_call_parser!r}.",
                field="tool_call_parser",
            )
