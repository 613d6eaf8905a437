"""Triton kernels of the engine, each with the plain-torch reference that the CPU path runs.

Every kernel is laid out as kernel -> launcher -> (backend): the ``triton.jit`` kernel (wrapped
lazily, so importing this package never imports triton), the launcher that checks arguments and
launches it (``write_kv``, ``decode_attention``, ``prefill_attention``, ``rmsnorm``, ``rotary``,
``silu_and_mul``, ``w4a16_gemm``), and a ``*_torch`` / ``*_reference`` function
with the same contract, which the tests compare against and the engine runs on CPU.

The paged KV cache these work on is described by :class:`PagedKV` (float or int8/int4 codes with
per (slot, kv head) scales and zero points; :class:`QuantizedKVLayout` allocates the quantized form).
:func:`resolve_kernels` picks Triton or torch once (``LMSTACK_KERNELS`` overrides ``auto``) and
:func:`apply_kernels` switches a core ``CausalLM``'s norms, rotary and activation to the Triton modules.
"""

from lmstack.infer.kernels._activation import silu_and_mul, silu_and_mul_reference
from lmstack.infer.kernels._decode_attention import decode_attention, decode_attention_torch
from lmstack.infer.kernels._dispatch import KERNELS_ENV, KernelChoice, apply_kernels, resolve_kernels
from lmstack.infer.kernels._kv_write import (
    PagedKV,
    QuantizedKVLayout,
    dequantize_kv,
    quantize_kv,
    write_kv,
    write_kv_torch,
)
from lmstack.infer.kernels._prefill_attention import prefill_attention, prefill_attention_torch
from lmstack.infer.kernels._rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_reference,
    rmsnorm,
    rmsnorm_reference,
)
from lmstack.infer.kernels._rotary import rotary, rotary_inplace, rotary_reference
from lmstack.infer.kernels._triton_utils import KernelUnavailableError, interpret_mode, triton_available
from lmstack.infer.kernels._w4a16 import W4A16Linear, w4a16_gemm, w4a16_gemm_reference

__all__ = [
    "KERNELS_ENV",
    "KernelChoice",
    "KernelUnavailableError",
    "PagedKV",
    "QuantizedKVLayout",
    "W4A16Linear",
    "apply_kernels",
    "decode_attention",
    "decode_attention_torch",
    "dequantize_kv",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_reference",
    "interpret_mode",
    "prefill_attention",
    "prefill_attention_torch",
    "quantize_kv",
    "resolve_kernels",
    "rmsnorm",
    "rmsnorm_reference",
    "rotary",
    "rotary_inplace",
    "rotary_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "triton_available",
    "w4a16_gemm",
    "w4a16_gemm_reference",
    "write_kv",
    "write_kv_torch",
]
