"""The engine: requests in, one batched forward per step over a paged KV cache, outputs out.

:class:`LLMEngine` and its :class:`EngineConfig` are the public API; the scheduler, the KV block
manager, the paged-attention backend and the sampler behind it live in private modules.
"""

from lmstack.infer.engine._engine import EngineConfig, LLMEngine

__all__ = ["EngineConfig", "LLMEngine"]
