"""The graph search agent: a planner grows a DAG of sub-questions, searchers answer them concurrently.

The planner never runs code: its replies are actions (JSON checked against a schema, generated under
that schema where the backend has guided decoding, or a Python subset parsed with :mod:`ast`), applied
to a networkx DAG that rejects duplicate names, unknown parents and cycles. A rejected reply is fed
back to the planner with the reason, at most ``max_retries`` times in a row. After each accepted reply
the new nodes run, each as soon as its parents are done and independent ones concurrently (at most
``concurrency`` at once); their answers go back to the planner, until it finishes or
``max_plan_steps`` replies have been accepted. The final answer is written from the nodes' answers,
with their citations renumbered into one reference list of pages that were read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lmstack.agent._errors import PlanError
from lmstack.agent._llm import achat, supports
from lmstack.agent.graph._actions import actions_schema, parse_actions
from lmstack.agent.graph._dag import Node, SearchGraph
from lmstack.agent.graph._events import AgentEvent
from lmstack.agent.graph._prompts import (
    FINAL_SYSTEM,
    PLANNER_JSON_GUIDED_SYSTEM,
    PLANNER_JSON_SYSTEM,
    PLANNER_PYTHON_SYSTEM,
)
from lmstack.agent.graph._searcher import (
    CitationStream,
    NodeSearcher,
    SearchSettings,
    citation_regex,
    normalize_url,
    rewrite_citations,
    strip_citations,
)
from lmstack.agent.tools import Page, fetch_page
from lmstack.infer import InvalidRequestError, SamplingParams

__all__ = ["GraphSearchAgent", "Reference", "SearchResult"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Reference:
    """One entry of the final answer's reference list.

    Args:
        n: Its number: the answer cites it as ``[n]``.
        url: The page's address.
        title: The page's title.
    """

    n: int
    url: str
    title: str


@dataclass
class SearchResult:
    """What a graph search found.

    Args:
        question: The question.
        answer: The final answer, citing ``[n]`` from ``references``.
        references: The pages the answer cites, all read during the search.
        nodes: Each node's state by name (question, parents, status, queries, pages, answer, citations).
        edges: ``(parent, child)`` pairs.
        events: Every event of the run.
        finished: Whether the planner finished (False: step or retry limit hit, answer from what was found).
    """

    question: str
    answer: str
    references: list[Reference]
    nodes: dict[str, dict[str, Any]]
    edges: list[tuple[str, str]]
    events: list[AgentEvent] = field(default_factory=list)
    finished: bool = True


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{name} must be an int >= {minimum}; got {value!r}", param=name)
    return value


class GraphSearchAgent:
    """Answers a question by planning a graph of sub-questions and searching for each (MindSearch's idea).

    Args:
        llm: Any LLM protocol implementation (:class:`~lmstack.infer.LLM`,
            :class:`~lmstack.infer.RemoteLLM`).
        search: A search backend: anything :func:`lmstack.agent.tools.search_hits` adapts (SearxNG, a
            JSON API, an lmstack-rag index, any object with ``search(query, k)``).
        fetch: ``await fetch(url) -> Page`` (default :func:`lmstack.agent.tools.fetch_page`). Hits whose
            address is not http(s) (a private index's paths) are read from the hit itself.
        max_nodes: Most sub-questions in the graph.
        max_plan_steps: Most planner replies accepted before the answer is written from what was found.
        max_retries: Most rejected planner replies in a row before giving up the same way.
        concurrency: Most nodes searching at once.
        queries_per_node: Most search queries per node.
        hits_per_query: Results asked of the backend per query.
        pages_per_node: Most pages each node reads.
        params: Sampling parameters of every model call (default: greedy, 1024 tokens).
        planner_format: ``"json"`` (the default; generated under the actions' schema where the backend
            takes ``response_format``) or ``"python"`` (the restricted subset, parsed, never run).
        page_chars: Most characters of each page shown to the model.
        search_timeout_s: Seconds each search may take before it counts as failed (None: no limit).
    """

    def __init__(
        self,
        llm: Any,
        search: Any,
        *,
        fetch: Callable[[str], Awaitable[Page]] | None = None,
        max_nodes: int = 8,
        max_plan_steps: int = 6,
        max_retries: int = 2,
        concurrency: int = 4,
        queries_per_node: int = 3,
        hits_per_query: int = 5,
        pages_per_node: int = 3,
        params: SamplingParams | None = None,
        planner_format: str | None = None,
        page_chars: int = 4000,
        search_timeout_s: float | None = 30.0,
    ) -> None:
        if planner_format not in (None, "json", "python"):
            raise InvalidRequestError(
                f'planner_format must be "json", "python" or None; got {planner_format!r}',
                param="planner_format",
            )
        if params is not None and not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be SamplingParams; got {type(params).__name__}", param="params"
            )
        if search_timeout_s is not None and (
            isinstance(search_timeout_s, bool)
            or not isinstance(search_timeout_s, (int, float))
            or not search_timeout_s > 0
        ):
            raise InvalidRequestError(
                f"search_timeout_s must be None or a number > 0; got {search_timeout_s!r}",
                param="search_timeout_s",
            )
        self.llm = llm
        self.search = search
        self.fetch = fetch
        self.max_nodes = _check_int("max_nodes", max_nodes, 1)
        self.max_plan_steps = _check_int("max_plan_steps", max_plan_steps, 1)
        self.max_retries = _check_int("max_retries", max_retries, 0)
        self.concurrency = _check_int("concurrency", concurrency, 1)
        # A fresh default per agent: SamplingParams is mutable, and one agent's change must not leak.
        self.params = params or SamplingParams(temperature=0.0, max_tokens=1024)
        self.planner_format = planner_format or "json"
        self.settings = SearchSettings(
            queries_per_node=_check_int("queries_per_node", queries_per_node, 1),
            hits_per_query=_check_int("hits_per_query", hits_per_query, 1),
            pages_per_node=_check_int("pages_per_node", pages_per_node, 1),
            page_chars=_check_int("page_chars", page_chars, 1),
            search_timeout_s=search_timeout_s,
            guided=supports(llm, "response_format"),
        )

    async def astream(self, question: str) -> AsyncIterator[AgentEvent]:
        """Search for ``question``, yielding every event as it happens (the last is ``done``).

        Leaving the loop early cancels the search.
        """
        events: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        run = _Run(self, question, events.put_nowait)
        task = asyncio.ensure_future(run.execute())
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            await task  # its own failure, if any (it reports errors as events and does not raise)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def stream(self, question: str) -> Generator[AgentEvent, None, None]:
        """:meth:`astream` for synchronous code: the search runs on its own event loop in a thread.

        Closing the iterator early cancels the search.
        """
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        running: dict[str, Any] = {}

        async def pump() -> None:
            running["loop"], running["task"] = asyncio.get_running_loop(), asyncio.current_task()
            try:
                async for event in self.astream(question):
                    items.put(("event", event))
            except Exception as exc:  # handed to the consumer's thread
                items.put(("error", exc))
            finally:
                items.put(("end", None))

        def main() -> None:
            with contextlib.suppress(asyncio.CancelledError):  # the consumer closed the stream early
                asyncio.run(pump())

        thread = threading.Thread(target=main, name="lmstack-graph-search", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = items.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise value
                yield value
        finally:
            if thread.is_alive() and "task" in running:
                with contextlib.suppress(RuntimeError):  # the loop has just closed: nothing to cancel
                    running["loop"].call_soon_threadsafe(running["task"].cancel)
            thread.join()

    async def arun(self, question: str) -> SearchResult:
        """Search for ``question`` and return the answer, the graph and every event."""
        return await _Run(self, question, None).execute()

    def run(self, question: str) -> SearchResult:
        """:meth:`arun` for synchronous code (also from inside a running event loop: it uses a thread)."""
        return _run_sync(lambda: self.arun(question))


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop runs here: use another thread's
        return pool.submit(asyncio.run, main()).result()


class _Run:
    """One search: the graph, the events, the planner conversation."""

    def __init__(
        self, agent: GraphSearchAgent, question: str, sink: Callable[[AgentEvent], None] | None
    ) -> None:
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequestError("the question must be a non-empty string", param="question")
        self.agent = agent
        self.question = question.strip()
        self.sink = sink
        self.events: list[AgentEvent] = []
        self.graph = SearchGraph(agent.max_nodes)
        self.t0 = time.perf_counter()
        self._done: dict[str, asyncio.Event] = {}
        # Citations are generated under a grammar where the backend can; off after its first refusal.
        self.guided_citations = agent.settings.guided and agent.settings.guided_citations

    def emit(self, type: str, **data: Any) -> None:
        event = AgentEvent(type, data, time.perf_counter() - self.t0)
        self.events.append(event)
        if self.sink is not None:
            self.sink(event)

    def _cite_params(self, cite: Iterable[int] | None) -> SamplingParams | None:
        """The sampling parameters of a reply that may cite only ``cite``, under the citation grammar.

        None where the grammar is off: no citable page, a backend without guided decoding (or one that
        rejected it earlier in this run), parameters that already carry a constraint, or a token
        budget too small for a claim and its citation.
        """
        params = self.agent.params
        if not cite or not self.guided_citations or params.guided_kind is not None:
            return None
        try:
            return dataclasses.replace(params, guided_regex=citation_regex(cite, params.max_tokens))
        except ValueError as exc:
            logger.debug("no citation grammar: %s", exc)
            return None

    def _no_guided_citations(self, exc: Exception) -> None:
        self.guided_citations = False
        logger.warning(
            "the model backend failed a reply under the citation grammar (%s: %s); asking again without "
            "it, and not using it again in this search",
            type(exc).__name__,
            exc,
        )

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, cite: Iterable[int] | None = None, **options: Any
    ) -> str:
        guided = self._cite_params(cite)
        if guided is not None:
            try:
                out = await achat(self.agent.llm, messages, guided, executor=self.executor, **options)
                return out.outputs[0].text or ""
            except Exception as exc:  # e.g. a plain OpenAI server, which refuses guided_regex
                self._no_guided_citations(exc)
        out = await achat(self.agent.llm, messages, self.agent.params, executor=self.executor, **options)
        return out.outputs[0].text or ""

    async def execute(self) -> SearchResult:
        agent = self.agent
        self.emit("start", question=self.question)
        # A blocking chat runs on a pool sized for the run's concurrency (threads start on demand):
        # the loop's default pool (cpu_count + 4 threads) could make independent nodes queue for one.
        self.executor = concurrent.futures.ThreadPoolExecutor(
            agent.concurrency + 2, thread_name_prefix="lmstack-agent"
        )
        fetch = agent.fetch if agent.fetch is not None else fetch_page
        self.searcher = NodeSearcher(self.chat, agent.search, fetch, agent.settings, self.emit)
        self.semaphore = asyncio.Semaphore(agent.concurrency)
        try:
            try:
                finished = await self._plan()
            except Exception as exc:  # a bug, not a bad reply: still answer from what was found
                logger.exception("graph search failed")
                self.emit("error", message=f"the search stopped: {type(exc).__name__}: {exc}")
                finished = False
            answer, references = await self._final()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.emit("final_answer", answer=answer, references=[vars(r).copy() for r in references])
        self.emit("done", seconds=round(time.perf_counter() - self.t0, 6))
        return SearchResult(
            question=self.question,
            answer=answer,
            references=references,
            nodes={name: node.to_json() for name, node in self.graph.nodes.items()},
            edges=self.graph.edges,
            events=list(self.events),
            finished=finished,
        )

    # -- the planner -------------------------------------------------------------------------------
    async def _plan(self) -> bool:
        """Plan and run nodes until the planner finishes (True) or a limit is hit (False)."""
        agent = self.agent
        python = agent.planner_format == "python"
        guided = not python and agent.settings.guided
        prompt = PLANNER_JSON_GUIDED_SYSTEM if guided else PLANNER_JSON_SYSTEM
        if python:
            prompt = PLANNER_PYTHON_SYSTEM
        system = prompt.format(max_nodes=agent.max_nodes)
        history: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question: {self.question}"},
        ]
        for step in range(agent.max_plan_steps):
            attempts: list[dict[str, Any]] = []
            failures = 0
            options: dict[str, Any] = {}
            if guided:  # parents from an enum of the nodes so far: never an unknown one
                schema = actions_schema(agent.max_nodes + 1, parents=list(self.graph.nodes))
                options["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "plan", "schema": schema, "strict": True},
                }
            while True:
                reply = None
                try:
                    reply = await self.chat(history + attempts, **options)
                    actions = parse_actions(reply, agent.planner_format)
                    added = self.graph.add(actions)
                    break
                except PlanError as exc:
                    error = str(exc)
                except Exception as exc:  # the model call itself failed: retry it, within the same bound
                    logger.warning("planner call failed: %s", exc)
                    error = f"the planner's model call failed: {type(exc).__name__}: {exc}"
                self.emit("planner_error", error=error)
                failures += 1
                if failures > agent.max_retries:
                    message = f"the planner failed {failures} times in a row; answering from what was found"
                    self.emit("error", message=message)
                    return False
                if reply is not None:
                    attempts += [
                        {"role": "assistant", "content": reply},
                        {
                            "role": "user",
                            "content": f"Your reply was rejected: {error}\nReply again with the fix.",
                        },
                    ]
            self.emit("plan", raw=reply, actions=[a.to_json() for a in actions])
            for node in added:
                self._done[node.name] = asyncio.Event()
                self.emit("node_added", name=node.name, question=node.question, parents=list(node.parents))
            await asyncio.gather(*(self._run_node(node) for node in added))
            if any(a.op == "finish" for a in actions):
                return True
            history += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": self._progress(added)},
            ]
            logger.debug("plan step %d done: %d nodes", step + 1, len(self.graph))
        self.emit(
            "error", message=f"the planner did not finish within {agent.max_plan_steps} steps; answering"
        )
        return False

    def _progress(self, added: Sequence[Node]) -> str:
        lines = ["Answers of the new nodes:"] if added else ["No node was added."]
        for node in added:
            answer = strip_citations(node.answer) if node.status == "answered" else f"(failed: {node.error})"
            lines.append(f"\n[{node.name}] {node.question}\n{answer}")
        room = self.agent.max_nodes - len(self.graph)
        lines.append(
            f"\nThe graph has {len(self.graph)} of at most {self.agent.max_nodes} nodes. "
            + ("Add nodes with new names, or finish." if room > 0 else "No more nodes may be added: finish.")
        )
        return "\n".join(lines)

    # -- the nodes ---------------------------------------------------------------------------------
    async def _run_node(self, node: Node) -> None:
        try:
            await asyncio.gather(*(self._done[p].wait() for p in node.parents))
            async with self.semaphore:
                node.status = "running"
                self.emit("node_started", name=node.name)
                parents = [self.graph.nodes[p] for p in node.parents]
                try:
                    await self.searcher.run(node, parents)
                except Exception as exc:  # the model failed for this node: the others go on
                    logger.warning("node %s failed: %s", node.name, exc)
                    node.status, node.error = "failed", f"{type(exc).__name__}: {exc}"
                    self.emit("node_failed", node=node.name, error=node.error)
                else:
                    node.status = "answered"
        finally:
            self._done[node.name].set()

    # -- the final answer --------------------------------------------------------------------------
    async def _final(self) -> tuple[str, list[Reference]]:
        numbers: dict[str, int] = {}  # normalized URL -> global number
        pages: dict[int, tuple[str, str]] = {}
        blocks = []
        for node in self.graph.nodes.values():
            if node.status != "answered":
                continue
            local = {}
            for citation in node.citations:
                n = numbers.setdefault(normalize_url(citation["url"]), len(numbers) + 1)
                pages.setdefault(n, (citation["url"], citation["title"]))
                local[citation["n"]] = n
            blocks.append(f"[{node.name}] {node.question}\n{rewrite_citations(node.answer, local.get)}")
        sources = "\n".join(f"[[{n}]] {title} ({url})" for n, (url, title) in pages.items())
        body = "\n\n".join(blocks) or "(no sub-question was answered: the search found nothing)"
        user = f"Question: {self.question}\n\nSub-questions and their answers:\n\n{body}"
        if sources:
            user += f"\n\nSources you may cite:\n{sources}"
        messages = [{"role": "system", "content": FINAL_SYSTEM}, {"role": "user", "content": user}]
        citations = CitationStream(pages)
        parts: list[str] = []
        try:
            async for piece in self._final_pieces(messages, list(pages)):
                text = citations.feed(piece)
                if text:
                    parts.append(text)
                    self.emit("answer_delta", text=text)
        except Exception as exc:
            logger.warning("final answer failed: %s", exc)
            self.emit("error", message=f"the final answer could not be written ({type(exc).__name__}: {exc})")
            if not parts:  # the nodes' answers are the best answer there is
                parts.append(citations.feed("\n\n".join(blocks) or "No answer: the search found nothing."))
                self.emit("answer_delta", text=parts[-1])
        rest = citations.close()
        if rest:
            parts.append(rest)
            self.emit("answer_delta", text=rest)
        answer = "".join(parts).strip()
        references = [Reference(m, *pages[g]) for g, m in citations.order.items()]
        return answer, references

    async def _final_pieces(self, messages: list[dict[str, Any]], cite: list[int]) -> AsyncIterator[str]:
        """The final answer's text in pieces: streamed where the backend streams, else in one piece.

        ``cite`` lists the global numbers the answer may cite (under the citation grammar, where on).
        """
        stream = getattr(self.agent.llm, "stream", None)
        started = False
        if stream is not None:
            guided = self._cite_params(cite)
            try:
                async with contextlib.aclosing(stream(messages, guided or self.agent.params)) as pieces:
                    async for out in pieces:
                        started = True
                        text = out.outputs[0].text if out.outputs else ""
                        if text:
                            yield text
                return
            except Exception as exc:
                if started:
                    raise
                # Streaming may be what failed, not the grammar: chat tries the grammar once more.
                logger.debug("streaming unavailable (%s); asking for the whole answer", exc)
        yield await self.chat(messages, cite=cite)
