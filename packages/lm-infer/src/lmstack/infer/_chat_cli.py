r"""``lmstack chat``: an interactive terminal chat with a local model or an OpenAI-compatible server.

Each line read is a user turn; the reply streams to stdout as it is generated and joins the history,
so the next turn sees the whole conversation. Lines starting with ``/`` are commands (``/help``).
Without a terminal on stdin it reads lines and prints only the replies (one per turn, each ended by a
newline), so a conversation can be scripted: ``printf 'hi\n/reset\nhello\n' | lmstack chat DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, TextIO, cast

from lmstack.core import LMStackError
from lmstack.infer._errors import InferError

if TYPE_CHECKING:
    from lmstack.infer import LLM, RemoteLLM
    from lmstack.infer._protocol import LLMProtocol
    from lmstack.infer._sampling_params import SamplingParams

__all__ = ["ChatSession", "register_chat"]

logger = logging.getLogger(__name__)

HELP = """\
commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it); the history stays
  /help           show this help
  /exit           leave (Ctrl-D too)
Ctrl-C while a reply streams stops that reply; the turn is dropped from the history."""


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


class ChatSession:
    """A conversation with an LLM (local or remote): its history, system prompt and sampling settings.

    Args:
        llm: An :class:`~lmstack.infer.LLM` or :class:`~lmstack.infer.RemoteLLM` (anything with an async
            ``stream(messages, sampling_params)`` that yields deltas).
        sampling_params: The sampling settings of every reply.
        system: The system prompt, or None for none.
        out: Where replies stream to.
        err: Where notices and errors go.
    """

    def __init__(
        self,
        llm: LLMProtocol,
        sampling_params: SamplingParams,
        *,
        system: str | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.llm = llm
        self.sampling_params = sampling_params
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        """The conversation as OpenAI chat messages: the system prompt, the history, then ``user``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return [*head, *self.history, *tail]

    def handle(self, line: str) -> bool:
        """Act on one input line: a command or a user turn. Returns False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text)
        self.turn(text)
        return True

    def _command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            self._notice("[history cleared]")
        elif name == "/system":
            self.system = rest.strip() or None
            self._notice("[system prompt set]" if self.system else "[system prompt removed]")
        elif name == "/help":
            print(HELP, file=self.out, flush=True)
        else:
            self._notice(f"unknown command {name!r}; /help lists the commands")
        return True

    def _notice(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def turn(self, user: str) -> str | None:
        """Send ``user`` with the history, stream the reply, and keep both in the history.

        An error (server unreachable, prompt over the context, ...) is printed and the turn dropped;
        Ctrl-C stops the reply (the request is aborted) and drops the turn too.

        Returns:
            The reply's text, or None when the turn failed or was interrupted.
        """
        messages = self.messages(user)
        pieces: list[str] = []
        try:
            finish = asyncio.run(self._stream(messages, pieces))
        except KeyboardInterrupt:
            self._end_line(pieces)
            self._notice("[interrupted; the turn was dropped]")
            return None
        except LMStackError as exc:
            self._end_line(pieces)
            message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
            print(f"error: {message or type(exc).__name__}", file=self.err, flush=True)
            return None
        reply = "".join(pieces)
        print(file=self.out, flush=True)
        if finish == "length":
            self._notice("[the reply reached --max-tokens]")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return reply

    def _end_line(self, pieces: list[str]) -> None:
        if pieces:  # a reply was cut off mid-line: end it before the notice
            print(file=self.out, flush=True)

    async def _stream(self, messages: list[dict[str, str]], pieces: list[str]) -> str | None:
        """Stream one reply into ``out`` (and ``pieces``); return its finish reason."""
        finish: str | None = None
        stream = cast(AsyncGenerator[Any, None], self.llm.stream(messages, self.sampling_params))
        # aclosing: leaving early (Ctrl-C cancels this task) aborts the request at once.
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if getattr(delta, "error", None):  # the engine finished the request with an error
                    raise InferError(str(delta.error))
                for completion in delta.outputs:
                    if completion.text:
                        pieces.append(completion.text)
                        self.out.write(completion.text)
                        self.out.flush()
                    finish = completion.finish_reason or finish
        return finish

    def run(self, lines: TextIO | None = None) -> None:
        """Read lines until EOF or ``/exit``; on a terminal with a ``>>>`` prompt and line editing."""
        source = lines or sys.stdin
        interactive = lines is None and source.isatty()
        if interactive:
            with contextlib.suppress(ImportError):  # line editing and history where readline exists
                import readline  # noqa: F401
            self._notice("type a message, /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = input(">>> ") if interactive else source.readline()
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt: clear the line, keep the session
                print(file=self.err)
                continue
            if not interactive and not line:
                break
            if not self.handle(line):
                break
        if interactive:
            print(file=self.err)


def _open_llm(args: argparse.Namespace) -> LLM | RemoteLLM:
    if _is_url(args.target):
        from lmstack.infer import RemoteLLM

        api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")
        return RemoteLLM(args.target, args.model, api_key=api_key, max_retries=args.max_retries)
    from lmstack.infer import LLM

    if args.model is not None:
        logger.warning("--model names a server's model; it is ignored for a local model directory")
    # One conversation, one reply at a time: a one-sequence engine, whose float32 CPU weights then take
    # the layout made for decoding a single row (EngineConfig.weight_layout "auto" picks "gemv").
    return LLM(args.target, dtype=args.dtype, max_num_seqs=1)


def _run_chat(args: argparse.Namespace) -> int:
    from lmstack.infer import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    llm = _open_llm(args)
    try:
        ChatSession(llm, params, system=args.system).run()
    finally:
        llm.close()
    return 0


def register_chat(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack chat PATH_OR_URL``."""
    p = subparsers.add_parser(
        "chat", help="chat with a local model or an OpenAI-compatible server",
        description="An interactive chat in the terminal: replies stream as they are generated and the "
        "conversation is kept. PATH_OR_URL is a Hugging Face model directory (run on lmstack's engine) "
        "or the URL of an OpenAI-compatible server (lmstack serve, vLLM, ...). Reads lines from stdin "
        "when it is not a terminal. Type /help in the chat for its commands.",
    )  # fmt: skip
    p.add_argument("target", metavar="PATH_OR_URL", help="model directory, or http(s):// server URL")
    p.add_argument("--system", help="the system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable replies")
    p.add_argument("--model", help="the server's model name (default: the only one it serves)")
    p.add_argument("--api-key", help="the server's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed server request")
    p.add_argument("--dtype", default=None, help="weight dtype of a local model (default: the checkpoint's)")
    p.set_defaults(func=_run_chat)
