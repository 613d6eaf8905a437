"""The remote client: the LLM protocol over any OpenAI-compatible HTTP server.

:class:`RemoteLLM` talks to ``lmstack serve``, vLLM, LMDeploy, SGLang or OpenAI with httpx; its outputs
are :class:`RemoteRequestOutput` s, which add the server's :class:`Usage` to
:class:`~lmstack.infer.RequestOutput`. Retries are set with ``RemoteLLM``'s ``max_retries``,
``backoff_base`` and ``backoff_max``.
"""

from lmstack.infer.remote._client import RemoteLLM
from lmstack.infer.remote._response import RemoteRequestOutput, Usage

__all__ = ["RemoteLLM", "RemoteRequestOutput", "Usage"]
