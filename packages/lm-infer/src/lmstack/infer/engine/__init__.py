"""The engine: scheduler, paged KV cache, sampler, and the step loop that ties them together."""

from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._engine import EngineConfig, LLMEngine
from lmstack.infer.engine._paged_attention import KVCache, PagedAttention
from lmstack.infer.engine._scheduler import Scheduler, SchedulerConfig

__all__ = [
    "BlockManager",
    "EngineConfig",
    "KVCache",
    "LLMEngine",
    "PagedAttention",
    "Scheduler",
    "SchedulerConfig",
]
