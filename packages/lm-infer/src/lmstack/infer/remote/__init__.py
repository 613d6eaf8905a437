"""The remote client: the LLM protocol over any OpenAI-compatible HTTP server.

:class:`RemoteLLM` talks to ``lmstack serve``, vLLM, LMDeploy, SGLang or OpenAI with httpx; its outputs
are :class:`RemoteRequestOutput` s, which add the server's :class:`Usage` to
:class:`~lmstack.infer.RequestOutput`.
"""

from lmstack.infer.remote._client import RemoteLLM
from lmstack.infer.remote._convert import RemoteRequestOutput, Usage
from lmstack.infer.remote._http import RetryPolicy
from lmstack.infer.remote._sse import ServerSentEvent, SSEDecoder

__all__ = ["RemoteLLM", "RemoteRequestOutput", "RetryPolicy", "SSEDecoder", "ServerSentEvent", "Usage"]
