"""``run.compile``: regional ``torch.compile`` of the decoder layers, and what it cost.

Each decoder layer but the last is compiled on its own (``nn.Module.compile``), as torchtitan does: the
layers share their code, so one graph (forward and backward) serves them all and compile time does not
grow with depth. The last layer stays eager: when few tokens carry the loss (fine-tuning on assistant
turns) core runs it on those rows alone, a set whose size changes every batch, which a compiled layer
would recompile for. On the 12M-parameter SFT benchmark, eager with that path ran 1,331 tokens/s and
every layer compiled (so without it) 1,159. Packed bins have a fixed shape and
:class:`~lmstack.core.PackedAttention` hands the attention operator fixed-shape inputs, so a run
compiles on its first step and never again; the graphs compiled
after each step are counted so a recompilation shows in ``metrics.jsonl`` and the run summary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from lmstack.core import CausalLM
from lmstack.train.data._errors import TrainError

__all__ = ["CompileWatch", "compile_decoder_layers"]

logger = logging.getLogger(__name__)


def compile_decoder_layers(model: CausalLM) -> int:
    """Compile the decoder layers of ``model`` but the last, in place (before data-parallel wrapping).

    Returns:
        The number of layers compiled.

    Raises:
        TrainError: The model has layers ``torch.compile`` cannot trace here (bitsandbytes 4-bit).
    """
    for name, module in model.named_modules():
        if "Linear4bit" in type(module).__name__:
            raise TrainError(
                f"run.compile cannot compile {name} ({type(module).__name__}: a bitsandbytes 4-bit layer of "
                "QLoRA); set run.compile: false for QLoRA runs."
            )
    layers = list(model.model.layers)
    chosen = layers[:-1] if len(layers) > 1 else layers
    for layer in chosen:
        layer.compile()
    logger.info("compiled %d of %d decoder layers (regional torch.compile)", len(chosen), len(layers))
    return len(chosen)


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class CompileWatch:
    """Counts the graphs compiled around each training step, and the time those steps took.

    Attributes:
        before_training: Graphs compiled before the first step (reference passes, probes).
        per_step: Graphs compiled during each step of this call.
        step_seconds: Each step's wall time.
    """

    before_training: int = 0
    per_step: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    _mark: int = 0

    def start(self) -> None:
        """Call once before the first step."""
        self._mark = _graphs()

    def step(self, seconds: float) -> int:
        """Record a finished step; returns the graphs it compiled."""
        now = _graphs()
        new, self._mark = now - self._mark, now
        self.per_step.append(new)
        self.step_seconds.append(seconds)
        return new

    @property
    def graphs(self) -> int:
        """Graphs compiled by the training steps of this call."""
        return sum(self.per_step)

    @property
    def recompilations(self) -> int:
        """Graphs compiled after the first step that compiled any (0 when shapes stay fixed)."""
        compiling = [i for i, n in enumerate(self.per_step) if n]
        return sum(self.per_step[compiling[0] + 1 :]) if compiling else 0

    @property
    def compile_seconds(self) -> float:
        """Time the compiling steps took beyond a steady step (the median of the others)."""
        steady = sorted(s for s, n in zip(self.step_seconds, self.per_step, strict=True) if not n)
        if not steady:
            return 0.0
        median = steady[len(steady) // 2]
        return sum(max(0.0, s - median) for s, n in zip(self.step_seconds, self.per_step, strict=True) if n)


def is_compiled(model: nn.Module) -> bool:
    """Whether a module's forward was compiled in place with ``nn.Module.compile``."""
    return getattr(model, "_compiled_call_impl", None) is not None
