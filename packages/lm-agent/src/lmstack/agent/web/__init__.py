"""The graph search agent's web page: the search graph growing live, each node's work, the cited answer.

::

    from lmstack.agent import GraphSearchAgent
    from lmstack.agent.web import create_app, serve

    app = create_app(lambda: GraphSearchAgent(llm, search))
    serve(app, port=8200)          # open http://127.0.0.1:8200/?q=your+question

Needs FastAPI and uvicorn: ``pip install 'lmstack-agent[server]'``. ``lmstack agent search --serve`` does
the same from the command line.
"""

from __future__ import annotations

from lmstack.agent.web._app import create_app, running, serve

__all__ = ["create_app", "running", "serve"]
