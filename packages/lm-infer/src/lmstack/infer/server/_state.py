"""What the request handlers share: the model, admission (the in-flight count), API keys and metrics.

A generation request holds a :class:`Ticket` from admission until its answer is complete; the count
of tickets is what ``--max-queue`` bounds and what a graceful shutdown waits on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmstack.infer._llm import LLM
from lmstack.infer.server._config import ServerConfig
from lmstack.infer.server._errors import APIError
from lmstack.infer.server._logprobs import TokenTexts
from lmstack.infer.server._metrics import Metrics
from lmstack.infer.server._tokens import PromptTokens

__all__ = ["ServerState", "Ticket"]

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One admitted request: holds its place in the in-flight count until released."""

    state: ServerState
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    first_token: bool = False
    released: bool = False

    def tokens(self, count: int) -> None:
        """Account ``count`` generated tokens (and the time to the first one)."""
        if count and not self.first_token:
            self.first_token = True
            self.state.metrics.observe_ttft(self.endpoint, time.perf_counter() - self.start)
        self.state.metrics.generation_tokens.inc(count)

    def release(self) -> None:
        """Free the request's place (idempotent)."""
        if not self.released:
            self.released = True
            self.state.in_flight -= 1


class ServerState:
    """The model, the settings, the metrics and the admission count of one application.

    Args:
        llm: The served model.
        config: The server's settings.
        close_llm: Close ``llm`` at shutdown.
    """

    def __init__(self, llm: LLM, config: ServerConfig, close_llm: bool) -> None:
        self.llm = llm
        self.config = config
        self.close_llm = close_llm
        self.metrics = Metrics()
        self.texts = TokenTexts(llm.tokenizer)
        # Prompts are tokenized off the event loop, and hopeless ones refused without tokenizing.
        self.tokens = PromptTokens(llm.tokenizer, llm.max_model_len)
        self.created = int(time.time())
        self.in_flight = 0
        self.draining = False  # no new requests: the server is shutting down
        self.closed = False  # the LLM is closed: what is still running ends with an error
        self._keys = [key.encode() for key in config.api_keys]
        # None: plan_chat detects the parser from the chat template (else hermes).
        self.tool_call_parser = config.tool_call_parser or llm.tool_call_parser

    def admit(self, endpoint: str) -> Ticket:
        """Take a place for a new generation request, or refuse it (503 draining, 429 full)."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down and takes no new requests; retry against another instance.",
                type_="server_error",
                code="shutting_down",
            )
        limit = self.config.max_queue
        if self.in_flight >= limit:
            raise APIError(
                429,
                f"the server already has {limit} requests in flight (its --max-queue limit); "
                "retry after a short wait.",
                type_="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        return Ticket(self, endpoint)

    def check_key(self, headers: Sequence[tuple[bytes, bytes]]) -> APIError | None:
        """None if the request carries an accepted API key (or none is needed), else the 401 to send."""
        if not self._keys:
            return None
        value = next((v for k, v in headers if k.lower() == b"authorization"), None)
        if value is None:
            return APIError(
                401,
                "missing API key: send it as the header 'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        scheme, _, key = value.partition(b" ")
        # Compare with every key, without stopping early, so the timing says nothing about them.
        matches = [hmac.compare_digest(key.strip(), accepted) for accepted in self._keys]
        if scheme.lower() != b"bearer" or not any(matches):
            return APIError(401, "invalid API key: check the key this server was started with.",
                            code="invalid_api_key")  # fmt: skip
        return None

    async def _wait_idle(self, timeout: float, stop_now: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and not stop_now():
            await asyncio.sleep(0.05)

    async def shutdown(self, timeout: float, stop_now: Callable[[], bool] = lambda: False) -> None:
        """Stop admitting, let in-flight requests finish, then close the LLM.

        Args:
            timeout: Seconds the requests in flight get to finish.
            stop_now: Polled while waiting; True ends the wait at once (a second Ctrl-C).
        """
        self.draining = True
        if self.in_flight and not stop_now():
            logger.warning(
                "shutting down: waiting up to %.0f s for %d request(s) in flight (Ctrl-C again to stop now)",
                timeout, self.in_flight,
            )  # fmt: skip
        await self._wait_idle(timeout, stop_now)
        if self.closed or not self.close_llm:
            return
        if self.in_flight:
            logger.warning("%d request(s) still running; ending them", self.in_flight)
        self.closed = True
        # Closing aborts every engine request with an error; their handlers then answer and release.
        await asyncio.to_thread(self.llm.close)
        await self._wait_idle(5.0, lambda: False)

    def gauges(self) -> dict[str, float]:
        """The live gauges of ``/metrics`` (read without the LLM's lock: a snapshot, never blocking)."""
        engine = self.llm.engine
        total = engine.num_blocks
        scheduler = engine.scheduler
        steps = self.llm.step_stats()
        return {
            "lmstack_requests_in_flight": self.in_flight,
            "lmstack_max_queue": self.config.max_queue,
            "lmstack_seqs_waiting": scheduler.num_waiting,
            "lmstack_seqs_running": scheduler.num_running,
            "lmstack_kv_blocks_total": total,
            "lmstack_kv_blocks_used": total - engine.num_free_blocks,
            "lmstack_engine_steps": steps.steps,
            "lmstack_engine_step_seconds_max": steps.max_step_s,
        }
