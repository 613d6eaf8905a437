"""lmstack.infer: serve models fast.

* :class:`LLM`: the offline API (``LLM(path).generate(prompts, SamplingParams(...))``), chat, async
  streaming and log-likelihood scoring on a continuous-batching engine with a paged KV cache.
* :class:`RemoteLLM`: the same protocol over any OpenAI-compatible server (``lmstack serve``, vLLM,
  LMDeploy, SGLang), with retries, bounded concurrency and streaming.
* :class:`LLMProtocol`: the interface lmstack-eval, lmstack-agent and lmstack-rag use.
"""

from lmstack.infer._errors import (
    InferError,
    InvalidRequestError,
    RemoteConnectionError,
    RemoteError,
    RemoteInvalidRequestError,
    RemoteTimeoutError,
    RemoteUnsupportedError,
    TokenizerUnavailableError,
)
from lmstack.infer._llm import LLM
from lmstack.infer._outputs import CompletionOutput, RequestOutput, ToolCall
from lmstack.infer._protocol import LLMProtocol
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine import EngineConfig, LLMEngine
from lmstack.infer.remote import RemoteLLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "InferError",
    "InvalidRequestError",
    "LLMEngine",
    "LLMProtocol",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteInvalidRequestError",
    "RemoteLLM",
    "RemoteTimeoutError",
    "RemoteUnsupportedError",
    "RequestOutput",
    "SamplingParams",
    "TokenizerUnavailableError",
    "ToolCall",
    "__version__",
]
