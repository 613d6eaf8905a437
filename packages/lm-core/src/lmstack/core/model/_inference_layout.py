"""Inference-only weight layouts: fused projections, weights packed for the device's fastest GEMM.

:meth:`~lmstack.core.model.CausalLM.prepare_for_inference` swaps the model's ``nn.Linear`` projections
for :class:`InferenceLinear` modules. Each holds one or more Hugging Face projections side by side (q, k
and v as one matrix; gate and up as one), so one GEMM replaces three or two, and stores the matrix in
the layout that multiplies fastest here. The module still reads and writes the Hugging Face names in
``state_dict()``, so a prepared model saves exactly like an unprepared one.

Measured on the 2-core AMD EPYC (AVX-512) machine, fp32, 2 and 1 threads, the llama shapes of the
benchmark model and of a 56M llama: oneDNN's linear over a weight reordered once for a batch of 32
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` packs on CPU) beat MKL's
``F.linear`` at every batch (2.2x to 5x at 32 tokens, 1.7x to 2x at one token when the weights leave
the cache) and beat pre-transposed ``x @ W`` and MKL's packed GEMM (``torch.ops.mkl._mkl_linear``).
The same packed weight serves one token and many, so one copy of each weight is kept.

The ``gemv`` layout is for an engine that decodes one sequence at a time: it keeps the plain ``[out, in]``
matrix and multiplies inputs of up to four rows with lmstack's own compiled kernel
(:mod:`~lmstack.core.model.cpu_kernels`), which streams the weights 1.4-1.8x faster than oneDNN's packed
linear at one row, and larger inputs (prefill) with oneDNN over the plain matrix, which is 1.4x slower
than the packed weight at 32 rows and level at 128.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core._errors import CheckpointError, ConfigError
from lmstack.core.model import cpu_kernels

__all__ = ["InferenceLinear", "WeightLayout", "resolve_layout"]

logger = logging.getLogger(__name__)

WeightLayout = Literal["auto", "onednn", "dense", "gemv"]

# The batch size oneDNN's reorder is tuned for: a weight packed for 32 rows measured as fast at one row
# as one packed for one row, and 3x faster at 32 rows.
_PACK_BATCH = 32


def _onednn_supports(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_layout(
    layout: WeightLayout, device: torch.device, dtype: torch.dtype, *, single_sequence: bool = False
) -> Literal["onednn", "dense", "gemv"]:
    """The concrete layout for ``layout`` on this device and dtype.

    ``auto`` packs for oneDNN on a CPU where oneDNN computes in ``dtype`` (float32; bfloat16 where the CPU
    has it) and keeps a plain fused matrix everywhere else (GPUs: cuBLAS takes the ``[out, in]`` matrix
    as it is). ``gemv`` is faster at a few rows and slower at many, so ``auto`` picks it only for
    ``single_sequence`` (a model that decodes one sequence at a time), in float32 on a CPU where the
    kernel builds.

    Raises:
        ConfigError: ``layout`` is unknown, or ``onednn`` or ``gemv`` was asked for where it cannot run
            (``gemv``: float32 on a CPU where lmstack's kernel compiled; the message says why not).
    """
    if layout not in ("auto", "onednn", "dense", "gemv"):
        raise ConfigError(f"unknown weight layout {layout!r}; use 'auto', 'onednn', 'dense' or 'gemv'.")
    one_row_cpu = single_sequence and device.type == "cpu" and dtype == torch.float32
    if layout == "auto" and one_row_cpu and cpu_kernels.available():
        return "gemv"
    if layout == "gemv":
        if device.type != "cpu" or dtype != torch.float32:
            raise ConfigError(
                f"the 'gemv' weight layout runs float32 weights on a CPU, got {device} {dtype}; "
                "use layout='auto'."
            )
        if not cpu_kernels.available():
            why = cpu_kernels.unavailable_reason()
            raise ConfigError(f"the 'gemv' weight layout cannot run here: {why}; use layout='auto'.")
        return "gemv"
    onednn_ok = device.type == "cpu" and _onednn_supports(dtype)
    if layout == "onednn" and not onednn_ok:
        raise ConfigError(
            f"the 'onednn' weight layout needs a CPU build of torch with oneDNN and float32 (or bfloat16 "
            f"where the CPU supports it) weights, got {device} {dtype}; use layout='auto' or 'dense'."
        )
    if layout == "auto":
        return "onednn" if onednn_ok else "dense"
    return layout


class InferenceLinear(nn.Module):
    """A frozen linear layer built from one or more Hugging Face projections laid side by side.

    ``InferenceLinear([("q_proj", q), ("k_proj", k), ("v_proj", v)], "qkv_proj", "onednn")`` computes
    ``cat([q(x), k(x), v(x)], -1)`` with one GEMM. The weight is a non-persistent buffer: in
    ``state_dict()`` the module writes the original projections under their own names (``q_proj.weight``
    next to where ``qkv_proj`` sits), so checkpoints keep the Hugging Face layout; loading a state dict
    into it is refused. Inference only: there is no backward through the oneDNN layout, and a prepared
    model is not meant to be moved or cast (``.to``) afterwards.

    Args:
        parts: ``(name, linear)`` pairs, in output order; every linear has the same input size.
        attr: The attribute name this module is registered under in its parent.
        layout: ``"onednn"`` (weight reordered for oneDNN), ``"dense"`` (a plain ``[out, in]`` matrix) or
            ``"gemv"`` (a plain matrix; up to :data:`~lmstack.core.model.cpu_kernels.MAX_ROWS` input rows
            through lmstack's CPU kernel, more through oneDNN).
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(
        self,
        parts: Sequence[tuple[str, nn.Linear]],
        attr: str,
        layout: Literal["onednn", "dense", "gemv"],
    ) -> None:
        super().__init__()
        if not parts or len({lin.in_features for _, lin in parts}) != 1:
            raise ConfigError("InferenceLinear needs at least one projection, all with the same input size.")
        with torch.no_grad():
            weights = [lin.weight.detach() for _, lin in parts]
            weight = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
            biases = [lin.bias for _, lin in parts]
            if any(b is None for b in biases) and not all(b is None for b in biases):
                raise ConfigError("fused projections must all have a bias or all have none.")
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
        self.attr = attr
        self.layout = layout
        self.names = [name for name, _ in parts]
        self.sizes = [lin.out_features for _, lin in parts]
        self.in_features = parts[0][1].in_features
        self.out_features = sum(self.sizes)
        if layout == "onednn":
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH)
        self._onednn_dense = layout == "gemv" and _onednn_supports(weight.dtype)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.eval()  # inference only, whatever mode the model it joins was in

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T + b`` over the last dimension, ``[..., in]`` to ``[..., out]``.

        Raises:
            ConfigError: The model was put back in training mode (its weights are frozen buffers, so
                training would silently leave them unchanged).
        """
        if self.training:
            raise ConfigError(
                "this model was prepared for inference (CausalLM.prepare_for_inference, which LLMEngine "
                "calls unless EngineConfig(fuse_weights=False)) and cannot be trained; train a freshly "
                "loaded model, or one given to the engine with fuse_weights=False."
            )
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        if self.layout == "gemv":
            if cpu_kernels.few_rows(x):  # the weight was checked when the layout was chosen
                return cpu_kernels.gemv(x, self.weight, self.bias)
            if self._onednn_dense:  # oneDNN reads the plain matrix faster than MKL's F.linear does
                return torch.ops.mkldnn._linear_pointwise(
                    x.contiguous(), self.weight, self.bias, "none", [], ""
                )
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> Tensor:
        """The fused weight as a plain ``[out, in]`` matrix (a copy for the oneDNN layout)."""
        return self.weight.to_dense() if self.layout == "onednn" else self.weight

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes, strict=True))
        return f"in_features={self.in_features}, {parts}, bias={self.bias is not None}, layout={self.layout}"

    # -- the Hugging Face view ------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # ``prefix`` ends in "<attr>."; the original projections were siblings of this module.
        parent = prefix[: len(prefix) - len(self.attr) - 1]
        weights = self.dense_weight().split(self.sizes)
        biases = self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        for name, w, b in zip(self.names, weights, biases, strict=True):
            destination[f"{parent}{name}.weight"] = w if keep_vars else w.detach()
            if b is not None:
                destination[f"{parent}{name}.bias"] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise CheckpointError(
            "cannot load weights into a model after prepare_for_inference(); load them into an "
            "unprepared CausalLM, then call prepare_for_inference()."
        )
