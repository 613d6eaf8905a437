"""Choosing between the Triton kernels and their torch references, and switching a model over.

:func:`resolve_kernels` turns the user's choice (``EngineConfig(kernels=...)``) into the implementation
that runs, once at engine start; :func:`apply_kernels` switches a core
:class:`~lmstack.core.CausalLM` to the Triton modules in place. Core's modules stay the default: the
switch swaps each module's class for a subclass (``TritonRMSNorm``, ``TritonAttention``, ``TritonMLP``,
``TritonDecoderLayer``) whose parameters, buffers and ``state_dict`` are the
same, so the model still saves, loads and prints as before.

Triton on CPU only exists as its interpreter (``TRITON_INTERPRET=1``), which is for tests: it runs a
kernel in numpy thousands of times slower than the torch reference. So asking for ``"triton"`` on CPU
without the interpreter is an error, not a silent slowdown.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from lmstack.core import CausalLM
from lmstack.core.model import MLP, Attention, DecoderLayer, RMSNorm
from lmstack.infer._errors import InferError
from lmstack.infer.kernels._activation import TritonMLP
from lmstack.infer.kernels._rmsnorm import TritonDecoderLayer, TritonRMSNorm
from lmstack.infer.kernels._rotary import TritonAttention
from lmstack.infer.kernels._triton_utils import interpret_mode, triton_available

__all__ = [
    "KERNELS_ENV",
    "KernelChoice",
    "apply_kernels",
    "resolve_kernels",
]

logger = logging.getLogger(__name__)

KernelChoice = Literal["auto", "triton", "torch"]

# Overrides an "auto" choice (tests set it with TRITON_INTERPRET=1 to force the Triton path on CPU).
KERNELS_ENV = "LMSTACK_KERNELS"


def resolve_kernels(choice: str, device: torch.device | str) -> Literal["triton", "torch"]:
    """The kernel implementation to run on ``device``.

    ``"auto"`` is Triton on a CUDA device when triton imports and torch everywhere else, unless the
    environment variable ``LMSTACK_KERNELS`` (``triton`` or ``torch``) says otherwise; an explicit
    ``"triton"`` or ``"torch"`` wins over the variable.

    Args:
        choice: ``"auto"``, ``"triton"`` or ``"torch"``.
        device: Where the model runs.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        InferError: ``choice`` (or ``LMSTACK_KERNELS``) is not one of the names above, or Triton was
            asked for where it cannot run: triton is not installed, or the device is a CPU and
            ``TRITON_INTERPRET=1`` is not set.
    """
    if choice not in ("auto", "triton", "torch"):
        raise InferError(f"unknown kernels choice {choice!r}; use 'auto', 'triton' or 'torch'.")
    device = torch.device(device)
    source = f"kernels={choice!r}"
    if choice == "auto":
        env = os.environ.get(KERNELS_ENV, "").strip().lower()
        if env and env not in ("triton", "torch", "auto"):
            raise InferError(f"{KERNELS_ENV}={env!r} is not valid; set it to 'triton', 'torch' or unset it.")
        if env in ("triton", "torch"):
            choice, source = env, f"{KERNELS_ENV}={env}"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "torch":
        return "torch"
    if not triton_available():
        raise InferError(
            f"{source} needs triton, which is not installed: pip install 'lmstack-infer[kernels]', "
            "or use kernels='torch'."
        )
    if device.type == "cpu" and not interpret_mode():
        raise InferError(
            f"{source} on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter, for tests only: far slower "
            "than the torch kernels); use kernels='torch' or 'auto' on CPU."
        )
    if device.type not in ("cpu", "cuda"):
        raise InferError(f"{source} runs on CUDA devices only, got {device}; use kernels='torch'.")
    if device.type == "cuda" and interpret_mode():
        raise InferError(
            f"{source} on {device} with TRITON_INTERPRET=1 set: the interpreter takes CPU tensors only; "
            "unset TRITON_INTERPRET."
        )
    return "triton"


_SWAPS: tuple[tuple[type[torch.nn.Module], type[torch.nn.Module]], ...] = (
    (RMSNorm, TritonRMSNorm),
    (Attention, TritonAttention),
    (MLP, TritonMLP),
    (DecoderLayer, TritonDecoderLayer),
)


def apply_kernels(model: CausalLM) -> None:
    """Switch ``model`` to the Triton kernels, in place: norms, fused residual add, rotary, SiLU-and-mul.

    Only modules whose class is exactly core's are switched (a subclass somebody else installed is
    left alone), so calling it twice is a no-op. Works before or after
    :meth:`~lmstack.core.CausalLM.prepare_for_inference`. Logits equal the torch path's up to float
    rounding (the kernels round once where torch rounds after each op).

    Args:
        model: A core causal LM whose weights are on the device the kernels will run on.

    Raises:
        InferError: Triton cannot run where the model's weights are (see :func:`resolve_kernels`).
    """
    resolve_kernels("triton", model.model.embed_tokens.weight.device)
    swapped = 0
    for module in model.modules():
        for core_cls, triton_cls in _SWAPS:
            if type(module) is core_cls:
                module.__class__ = triton_cls
                swapped += 1
    logger.info("switched %d modules to the Triton kernels", swapped)
