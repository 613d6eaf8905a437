"""Tools for agents: the ``@tool`` decorator, built-in tools, search backends and page fetching.

Write a tool as a typed function with a Google docstring; :func:`tool` builds the JSON schema of its
parameters from the type hints (str, int, float, bool, ``list[...]``, dict, ``Literal``, ``Optional``,
``Enum``, pydantic models; parameters with defaults are optional) and takes the description from the
docstring's summary and ``Args:`` lines::

    from lmstack.agent.tools import tool

    @tool(timeout_s=5)
    def convert(amount: float, unit: Literal["km", "mi"] = "km") -> float:
        '''Convert a distance to metres.'''   # plus an Args: section describing each parameter
        return amount * (1000 if unit == "km" else 1609.344)

    convert.spec()                               # OpenAI's {"type": "function", "function": {...}}
    await convert.acall('{"amount": "2"}')       # ToolOutput(ok=True, content="2000.0", data=2000.0)
    await convert.acall({"amount": "far"})       # ToolOutput(ok=False, content="convert: invalid arguments:
                                                 #   field 'amount': Input should be a valid number, ...")
    convert(3)                                   # the plain function: 3000.0

:meth:`Tool.acall` never raises: wrong arguments (wrong type, missing, unknown field, not JSON), an
exception in the tool (``"<tool> failed: <Type>: <message>"``) and a timeout all come back as
``ToolOutput(ok=False, content=<message for the model>)``, so an agent feeds the message back and goes on.
Sync tools run in a worker thread, async tools on the loop; results that are not text are JSON-encoded.

Built-in tools:

* :data:`calculator` — arithmetic by walking the expression's syntax tree (no ``eval``): numbers,
  ``+ - * / // % **``, parentheses, ``pi``/``e``/``tau`` and ``sqrt log exp sin cos tan abs round min max``
  (and a few more); exact integers up to about 3000 digits, so ``10**10**10`` is refused at once.
* :func:`python_tool` — runs the model's code in lmstack-core's process sandbox
  (:mod:`lmstack.agent.sandbox`): a fresh process per call with time, memory and process limits, no
  network, and no file access outside a private temporary directory. An infinite loop, a memory or fork
  bomb, a socket, a write or read outside that directory all come back as a failed result with the
  sandbox's message. No state is kept between calls. It shares the host kernel: it is not a VM.
* :func:`web_search_tool` — searches any backend: :class:`SearxNGSearch` (SearxNG's JSON API),
  :class:`JSONSearch` (any JSON search API: URL or template, results path, field names), or any object
  with ``search(query, k)`` (sync or async) returning hits as objects or dicts — lmstack-rag's ``Index``
  (``text``, ``source``, ``score``, ``metadata``) serves as a private search engine this way, without either
  package importing the other. :func:`search_hits` is the adapter; failures (down, slow, not JSON, no
  results list) raise :class:`~lmstack.agent.SearchError` naming the backend and what to check, after
  one retry on connection errors and 5xx answers.
* :func:`fetch_tool` — :func:`fetch_page`: httpx with redirects, a time limit for the whole fetch, a
  streamed size limit (a huge page costs at most ``max_bytes``), text types only (binary types and bodies
  with NUL bytes are refused), the charset from the header, a BOM or ``<meta>``, and HTML turned into text
  by the standard library's parser (title and headings kept; scripts, styles and navigation dropped).
  It fetches whatever URL it is given, loopback and private addresses included: run agents that browse
  the open web where those hold nothing to protect.

:class:`LocalSearchServer` serves a folder of Markdown or text files as a SearxNG-compatible search
engine (BM25) with the documents as pages, for offline use and tests.
"""

from __future__ import annotations

from lmstack.agent.tools._calculator import CalculatorError, calculator, evaluate
from lmstack.agent.tools._fetch import Page, fetch_page, fetch_tool, html_to_text
from lmstack.agent.tools._local_search import LocalSearchServer
from lmstack.agent.tools._python import python_tool
from lmstack.agent.tools._search import JSONSearch, SearchHit, SearxNGSearch, search_hits, web_search_tool
from lmstack.agent.tools._tool import Tool, ToolOutput, tool

__all__ = [
    "CalculatorError",
    "JSONSearch",
    "LocalSearchServer",
    "Page",
    "SearchHit",
    "SearxNGSearch",
    "Tool",
    "ToolOutput",
    "calculator",
    "evaluate",
    "fetch_page",
    "fetch_tool",
    "html_to_text",
    "python_tool",
    "search_hits",
    "tool",
    "web_search_tool",
]
