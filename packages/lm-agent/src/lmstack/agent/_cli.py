"""``lmstack agent``: a graph search from the command line or its web page, and a chat with tools.

::

    lmstack agent search "question" --llm URL_OR_PATH --search BACKEND [--serve [--host H] [--port N]]
    lmstack agent chat --llm URL_OR_PATH [--tools calculator,python,web_search,fetch_page] [--search BACKEND]

``--llm`` is an OpenAI-compatible server's URL (``http://127.0.0.1:8000/v1``: lmstack serve, vLLM,
LMDeploy, OpenAI) or a local model directory. ``--search`` is a SearxNG instance's URL, or
``local:FOLDER`` to search a folder of documents through a :class:`LocalSearchServer` started for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote

from lmstack.agent._errors import AgentError

__all__ = ["register_agent", "run_chat", "run_search"]

_API_KEY_ENV = "LMSTACK_AGENT_API_KEY"
TOOL_NAMES = ("calculator", "python", "web_search", "fetch_page")


def _load_llm(args: argparse.Namespace) -> Any:
    """A RemoteLLM for a URL, a local engine for a model directory."""
    spec = args.llm
    if spec.startswith(("http://", "https://")):
        from lmstack.infer import RemoteLLM

        return RemoteLLM(spec, model=args.model, api_key=args.api_key or os.environ.get(_API_KEY_ENV))
    if not os.path.isdir(spec):
        raise AgentError(f"--llm {spec!r} is neither an http(s) URL nor a model directory")
    from lmstack.infer import LLM

    return LLM(spec, device=args.device)


@contextlib.contextmanager
def _search_backend(spec: str) -> Iterator[Any]:
    """The search backend named by ``--search``; a ``local:`` one serves while the block runs."""
    from lmstack.agent.tools import LocalSearchServer, SearxNGSearch

    if spec.startswith("local:"):
        with LocalSearchServer(spec[len("local:") :]) as server:
            print(f"local search: {len(server.documents)} documents at {server.url}", file=sys.stderr)
            yield SearxNGSearch(server.url)
    elif spec.startswith(("http://", "https://")):
        yield SearxNGSearch(spec)
    else:
        raise AgentError(f"--search {spec!r}: give a SearxNG URL (http://HOST:PORT) or local:FOLDER")


def _params(args: argparse.Namespace) -> Any:
    from lmstack.infer import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)


def _oneline(text: Any, limit: int = 160) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# One progress line per event type: a template over the event's fields (text flattened to one line).
_LINES = {
    "start": "question: {question}",
    "planner_error": "! planner reply rejected: {error}",
    "node_started": "> {name}: searching",
    "page_read": "  {node}: read {url} ({chars} chars)",
    "page_failed": "  {node}: could not read {url}: {error}",
    "node_answer": "= {node}: {answer}",
    "node_failed": "x {node} failed: {error}",
    "error": "! {message}",
}


def describe_event(event: dict[str, Any]) -> str | None:
    """One readable progress line for a search event (its JSON form); None for the answer's own events."""
    kind = event.get("type")
    if kind in ("answer_delta", "final_answer"):
        return None
    if kind in _LINES:
        fields = {key: _oneline(value) if isinstance(value, str) else value for key, value in event.items()}
        return _LINES[kind].format_map(fields)
    if kind == "plan":
        actions = event.get("actions", [])
        ops = [f"add {a.get('name')}" if a.get("op") == "add_node" else str(a.get("op")) for a in actions]
        return f"plan: {', '.join(ops) or 'nothing'}"
    if kind == "node_added":
        after = f" (after {', '.join(event['parents'])})" if event.get("parents") else ""
        return f"+ {event['name']}: {event['question']}{after}"
    if kind == "queries":
        return f"  {event['node']}: queries {' | '.join(event.get('queries', []))}"
    if kind == "search_results":
        if event.get("error"):
            return f"  {event['node']}: search {event['query']!r} failed: {_oneline(event['error'])}"
        return f"  {event['node']}: {len(event.get('hits', []))} results for {event['query']!r}"
    if kind == "done":
        return f"done in {float(event['seconds']):.1f} s"
    return f"({kind})"  # a newer event type


def _print_search(agent: Any, question: str, *, as_json: bool, out: IO[str], err: IO[str]) -> int:
    """Run the search, printing progress to ``err`` and the answer (or JSON lines) to ``out``."""
    streamed = False
    answer = ""
    for event in agent.stream(question):
        payload = event.to_json()
        if as_json:
            print(json.dumps(payload, ensure_ascii=False), file=out, flush=True)
        elif payload["type"] == "answer_delta":
            if not streamed:
                print("\nAnswer:", file=out)
            streamed = True
            print(payload["text"], end="", file=out, flush=True)
        elif payload["type"] == "final_answer":
            if not streamed:
                print(f"\nAnswer:\n{payload['answer']}", end="", file=out)
            print(file=out)
            if payload["references"]:
                print("\nReferences:", file=out)
                for ref in payload["references"]:
                    print(f"[{ref['n']}] {ref['title']} <{ref['url']}>", file=out)
            out.flush()
        else:
            line = describe_event(payload)
            if line is not None:
                print(line, file=err, flush=True)
        if payload["type"] == "final_answer":
            answer = payload["answer"]
    return 0 if answer.strip() else 1


def run_search(args: argparse.Namespace, *, llm: Any = None) -> int:
    """``lmstack agent search``.

    Args:
        args: The parsed command line.
        llm: The model to use instead of loading ``--llm`` (tests and embedding applications).

    Returns:
        0 when the search produced an answer, 1 when it did not.
    """
    from lmstack.agent.graph import GraphSearchAgent

    if not args.serve and not args.question:
        raise AgentError("give the question to search for (or --serve to ask it on the web page)")
    if args.serve:
        missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
        if missing:
            raise AgentError(f"--serve needs {' and '.join(missing)}: pip install 'lmstack-agent[server]'")
    model = llm if llm is not None else _load_llm(args)
    options = {
        "max_nodes": args.max_nodes,
        "concurrency": args.concurrency,
        "params": _params(args),
        "planner_format": args.planner_format,
    }
    with _search_backend(args.search) as backend:
        if not args.serve:
            agent = GraphSearchAgent(model, backend, **options)
            return _print_search(agent, args.question, as_json=args.json, out=sys.stdout, err=sys.stderr)
        from lmstack.agent.web import create_app, serve

        app = create_app(lambda: GraphSearchAgent(model, backend, **options))

        def ready(url: str) -> None:
            page = f"{url}/?q={quote(args.question)}" if args.question else f"{url}/"
            print(f"lmstack agent: the search page is at {page} (Ctrl-C stops)", flush=True)

        serve(app, host=args.host, port=args.port, on_ready=ready)
    return 0


def _make_tools(names: list[str], search: str | None, stack: contextlib.ExitStack) -> list[Any]:
    from lmstack.agent.tools import calculator, fetch_tool, python_tool, web_search_tool

    tools = []
    for name in names:
        if name == "calculator":
            tools.append(calculator)
        elif name == "python":
            tools.append(python_tool())
        elif name == "fetch_page":
            tools.append(fetch_tool())
        elif name == "web_search":
            if not search:
                raise AgentError("the web_search tool needs --search (a SearxNG URL or local:FOLDER)")
            tools.append(web_search_tool(stack.enter_context(_search_backend(search))))
        else:
            raise AgentError(f"unknown tool {name!r}; the tools are {', '.join(TOOL_NAMES)}")
    return tools


def _print_steps(result: Any, err: IO[str]) -> None:
    for step in result.steps:
        if step.kind == "tool_call":
            print(f"  -> {step.tool}({_oneline(step.arguments or step.content, 200)})", file=err)
        elif step.kind == "tool_result":
            mark = "<-" if step.ok else "<- failed:"
            print(f"  {mark} {_oneline(step.content, 200)}", file=err)
        elif step.kind == "error":
            print(f"  ! {_oneline(step.content, 200)}", file=err)
        elif step.kind in ("thought", "plan") and step.content.strip():
            print(f"  ({step.kind}) {_oneline(step.content, 200)}", file=err)
    err.flush()


def run_chat(args: argparse.Namespace, *, llm: Any = None, stdin: IO[str] | None = None) -> int:
    """``lmstack agent chat``: one agent run per line of input, the conversation kept between lines.

    ``/reset`` forgets the conversation; ``/exit``, ``/quit`` or the end of input stop.

    Args:
        args: The parsed command line.
        llm: The model to use instead of loading ``--llm`` (tests and embedding applications).
        stdin: Where the lines come from (default: standard input).

    Returns:
        0.
    """
    from lmstack.agent.agents import FunctionCallingAgent, ReActAgent, ReWOOAgent

    names = [name.strip() for name in args.tools.split(",") if name.strip()]
    model = llm if llm is not None else _load_llm(args)
    lines = stdin if stdin is not None else sys.stdin
    interactive = lines.isatty()
    kinds = {"function": FunctionCallingAgent, "react": ReActAgent, "rewoo": ReWOOAgent}
    with contextlib.ExitStack() as stack:
        tools = _make_tools(names, args.search, stack)
        options: dict[str, Any] = {
            "system": args.system,
            "max_steps": args.max_steps,
            "params": _params(args),
        }
        agent = kinds[args.agent](model, tools, **options)
        tools_shown = ", ".join(names) or "none"
        print(
            f"lmstack agent chat ({args.agent}; tools: {tools_shown}); /reset forgets, /exit quits",
            file=sys.stderr,
        )
        while True:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = lines.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                agent.reset()
                print("(conversation forgotten)", file=sys.stderr)
                continue
            try:
                result = agent.run(text)
            except Exception as exc:  # one failed turn (the model unreachable) does not end the chat
                print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            _print_steps(result, sys.stderr)
            print(result.answer, flush=True)
            if not result.finished:
                print("(stopped at the step limit; the answer is the best so far)", file=sys.stderr)
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llm", required=True, metavar="URL_OR_PATH",
        help="an OpenAI-compatible server (http://HOST:PORT/v1) or a local model directory",
    )  # fmt: skip
    p.add_argument("--model", help="the model name to ask a server for (default: its first model)")
    p.add_argument("--api-key", help=f"the server's API key (default: ${_API_KEY_ENV})")
    p.add_argument("--device", default="cpu", help="device of a local model (default: cpu)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    p.add_argument(
        "--max-tokens", type=int, default=1024, help="most tokens of each model reply (default: 1024)"
    )


def register_agent(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack agent search`` and ``lmstack agent chat``."""
    agent = subparsers.add_parser(
        "agent", help="agents: a graph search with citations, a chat with tools",
        description="Agents over any model lmstack can talk to: a graph search that splits a question into "
        "sub-questions, searches each and answers with citations (search), and a tool-using chat (chat).",
    )  # fmt: skip
    sub = agent.add_subparsers(title="subcommands", dest="agent_command", metavar="SUBCOMMAND", required=True)

    search = sub.add_parser(
        "search", help="answer a question by a graph of web searches, with citations",
        description="Plan sub-questions, search and read pages for each (independent ones at the same time), "
        "and answer with numbered citations. Progress goes to stderr, the answer and its references to "
        "stdout. With --serve, the web page shows the graph growing instead.",
    )  # fmt: skip
    search.add_argument("question", nargs="?", help="the question (optional with --serve)")
    _model_options(search)
    search.add_argument(
        "--search", required=True, metavar="BACKEND",
        help="a SearxNG URL (http://HOST:PORT) or local:FOLDER (a folder of .md/.txt/.html/.jsonl documents, "
        "served for the run)",
    )  # fmt: skip
    search.add_argument("--max-nodes", type=int, default=8, help="most sub-questions (default: 8)")
    search.add_argument(
        "--concurrency", type=int, default=4, help="most sub-questions searched at once (default: 4)"
    )
    search.add_argument("--planner-format", choices=("json", "python"), default=None,
                        help="how the planner writes its graph (default: json)")  # fmt: skip
    search.add_argument("--json", action="store_true", help="print every event as a JSON line instead")
    search.add_argument(
        "--serve", action="store_true", help="serve the search page instead of searching once"
    )
    search.add_argument(
        "--host", default="127.0.0.1", help="with --serve: address to listen on (default: 127.0.0.1)"
    )
    search.add_argument(
        "--port", type=int, default=8200, help="with --serve: port (default: 8200; 0 picks one)"
    )
    search.set_defaults(func=run_search)

    chat = sub.add_parser(
        "chat", help="chat with an agent that uses tools",
        description="Read messages from stdin, one a line; the agent may call its tools before it answers. "
        "Tool calls and results go to stderr, answers to stdout. /reset forgets the conversation.",
    )  # fmt: skip
    _model_options(chat)
    chat.add_argument(
        "--tools", default="calculator,python", metavar="NAMES",
        help=f"comma-separated, from {', '.join(TOOL_NAMES)} (default: calculator,python)",
    )  # fmt: skip
    chat.add_argument(
        "--search", metavar="BACKEND", help="the web_search tool's backend: a SearxNG URL or local:FOLDER"
    )
    chat.add_argument(
        "--agent", choices=("function", "react", "rewoo"), default="function",
        help="function calling (default), ReAct, or ReWOO (plan, then run the steps)",
    )  # fmt: skip
    chat.add_argument("--system", help="the system prompt")
    chat.add_argument(
        "--max-steps", type=int, default=8, help="most tool-calling turns per message (default: 8)"
    )
    chat.set_defaults(func=run_chat)
