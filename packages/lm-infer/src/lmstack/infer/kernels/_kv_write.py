"""Writing new keys and values into the paged KV cache, quantizing on write when the cache is quantized.

Layout (one layer; the engine's cache stacks layers in front: ``[layers, slots, kv_heads, ...]``):

* An unquantized cache stores keys and values as ``[slots, kv_heads, head_dim]`` in a float dtype.
* A quantized cache (:class:`QuantizedKVLayout`) stores ``uint8`` codes ``[slots, kv_heads,
  head_dim]`` (int8) or ``[slots, kv_heads, head_dim // 2]`` (int4, two codes a byte along
  ``head_dim``: element ``2j`` in the low nibble of byte ``j``, element ``2j + 1`` in the high one),
  plus per (slot, kv head) a scale and a zero point, ``[slots, kv_heads]`` each, in ``param_dtype``
  (fp16 by default). Quantization is asymmetric, per token and head::

      lo = min(min(x), 0);  hi = max(max(x), 0)          # the range always holds 0
      scale = max((hi - lo) / qmax, tiny)  (rounded to param_dtype)
      zero = clamp(floor(-lo / scale + 0.5), 0, qmax)    # an integer: exact in fp16
      q = clamp(floor(x / scale + 0.5) + zero, 0, qmax)   # qmax = 255 (int8) or 15 (int4)
      x' = (q - zero) * scale

  so ``|x - x'| <= scale / 2`` up to the rounding of ``scale`` to ``param_dtype`` (which can push
  the largest element at most ``qmax * scale * eps(param_dtype)`` further). Holding 0 in the range
  keeps the zero point inside ``[0, qmax]`` and makes an all-zero vector exact.

A token's slot is ``block_table[p // block_size] * block_size + p % block_size``; a slot of ``-1`` in
``slot_mapping`` means "do not write" (padding tokens).

How the engine calls it, per layer, inside its attention backend::

    layer_cache = cache.layer(layer_idx)               # a PagedKV of 3-D per-layer views
    write_kv(layer_cache, k, v, slot_mapping)          # Triton on CUDA (one launch for k, one for v)
    write_kv_torch(layer_cache, k, v, slot_mapping)    # the torch reference: the CPU path

``k`` and ``v`` are ``[N, kv_heads, head_dim]`` (the flattened step), ``slot_mapping`` ``[N]`` int64
on the cache's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.infer._errors import InferError
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = [
    "PagedKV",
    "QuantizedKVLayout",
    "dequantize_kv",
    "quantize_kv",
    "write_kv",
    "write_kv_torch",
]


@dataclass(frozen=True)
class QuantizedKVLayout:
    """How a quantized KV cache is stored (see the module docstring for the formula).

    Args:
        bits: 8 (int8: one ``uint8`` code per element) or 4 (int4: two codes per ``uint8``).
        head_dim: Elements per key or value vector (even for int4).
        param_dtype: dtype of the per (slot, kv head) scale and zero point (fp16 or fp32).
    """

    bits: int
    head_dim: int
    param_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InferError(f"KV cache quantization supports 8 or 4 bits, not {self.bits}.")
        if self.bits == 4 and self.head_dim % 2:
            raise InferError(
                f"an int4 KV cache packs two values a byte along head_dim, so head_dim must be even "
                f"(got {self.head_dim}); use int8 for this model."
            )
        if self.param_dtype not in (torch.float16, torch.float32):
            raise InferError(f"scales and zero points are stored in fp16 or fp32, not {self.param_dtype}.")

    @property
    def qmax(self) -> int:
        """The largest code (255 or 15)."""
        return (1 << self.bits) - 1

    @property
    def storage_dim(self) -> int:
        """Bytes per (slot, kv head) vector in the code tensor: ``head_dim`` or ``head_dim // 2``."""
        return self.head_dim if self.bits == 8 else self.head_dim // 2

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        """KV-cache bytes one token takes across layers, keys and values, codes and parameters."""
        param = torch.empty((), dtype=self.param_dtype).element_size()
        return 2 * num_layers * num_kv_heads * (self.storage_dim + 2 * param)

    def allocate(
        self, num_layers: int, num_slots: int, num_kv_heads: int, device: torch.device | str = "cpu"
    ) -> PagedKV:
        """Zeroed cache tensors ``[layers, slots, kv_heads, ...]`` in this layout."""
        codes = (num_layers, num_slots, num_kv_heads, self.storage_dim)
        params = (num_layers, num_slots, num_kv_heads)

        def z(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return PagedKV(
            keys=z(codes, torch.uint8),
            values=z(codes, torch.uint8),
            bits=self.bits,
            k_scales=z(params, self.param_dtype),
            k_zeros=z(params, self.param_dtype),
            v_scales=z(params, self.param_dtype),
            v_zeros=z(params, self.param_dtype),
        )


@dataclass(frozen=True)
class PagedKV:
    """The tensors of a paged KV cache, for all layers (4-D) or one layer (3-D, what kernels take).

    Attributes:
        keys: ``[(layers,) slots, kv_heads, head_dim]`` float, or ``uint8`` codes when quantized
            (``head_dim // 2`` bytes a vector for int4).
        values: Same layout as ``keys``.
        bits: None for a float cache, else 8 or 4.
        k_scales: ``[(layers,) slots, kv_heads]`` key scales (quantized caches only).
        k_zeros: Key zero points, same shape.
        v_scales: Value scales, same shape.
        v_zeros: Value zero points, same shape.
    """

    keys: Tensor
    values: Tensor
    bits: int | None = None
    k_scales: Tensor | None = None
    k_zeros: Tensor | None = None
    v_scales: Tensor | None = None
    v_zeros: Tensor | None = None

    @property
    def quantized(self) -> bool:
        """Whether the cache holds int8/int4 codes."""
        return self.bits is not None

    @property
    def head_dim(self) -> int:
        """Elements per key vector (before packing)."""
        return self.keys.shape[-1] * (2 if self.bits == 4 else 1)

    def layer(self, index: int) -> PagedKV:
        """Views of one layer's tensors (drops the leading layer dimension)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return PagedKV(
            self.keys[index],
            self.values[index],
            self.bits,
            pick(self.k_scales),
            pick(self.k_zeros),
            pick(self.v_scales),
            pick(self.v_zeros),
        )

    def planes(self) -> tuple[tuple[Tensor, Tensor | None, Tensor | None], ...]:
        """``((keys, k_scales, k_zeros), (values, v_scales, v_zeros))``."""
        return (self.keys, self.k_scales, self.k_zeros), (self.values, self.v_scales, self.v_zeros)

    def validate(self) -> None:
        """Raise :class:`InferError` when the tensors do not form a cache of this kind."""
        if self.bits is None:
            if not self.keys.dtype.is_floating_point or self.keys.dtype != self.values.dtype:
                raise InferError(
                    f"an unquantized KV cache needs float keys and values of one dtype, got "
                    f"{self.keys.dtype} and {self.values.dtype}; pass bits= for uint8 codes."
                )
            return
        if self.bits not in (4, 8):
            raise InferError(f"KV cache quantization supports 8 or 4 bits, not {self.bits}.")
        for name, codes, scales, zeros in (
            ("keys", self.keys, self.k_scales, self.k_zeros),
            ("values", self.values, self.v_scales, self.v_zeros),
        ):
            if codes.dtype != torch.uint8:
                raise InferError(f"quantized {name} must be uint8 codes, got {codes.dtype}.")
            if scales is None or zeros is None:
                raise InferError(f"a quantized cache needs scales and zero points for its {name}.")
            if scales.shape != codes.shape[:-1] or zeros.shape != codes.shape[:-1]:
                raise InferError(
                    f"{name} scales/zeros must be {tuple(codes.shape[:-1])} (one per slot and kv head), "
                    f"got {tuple(scales.shape)} and {tuple(zeros.shape)}."
                )


def _param_eps(dtype: torch.dtype) -> float:
    # The smallest normal number of the parameter dtype, so the stored scale is never 0.
    return float(torch.finfo(dtype).tiny)


def quantize_kv(
    x: Tensor, bits: int, param_dtype: torch.dtype = torch.float16
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize vectors along the last dimension (the torch reference of the write kernel).

    Args:
        x: ``[..., head_dim]`` float tensor.
        bits: 8 or 4.
        param_dtype: dtype of the returned scales and zero points.

    Returns:
        ``(codes, scales, zeros)``: ``uint8`` codes ``[..., head_dim]`` (int8) or
        ``[..., head_dim // 2]`` (int4, packed), and scales and zero points ``[...]``.
    """
    qmax = float((1 << bits) - 1)
    xf = x.float()
    lo = xf.amin(-1).clamp(max=0.0)
    hi = xf.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=_param_eps(param_dtype)).to(param_dtype).float()
    zero = torch.floor(-lo / scale + 0.5).clamp(0.0, qmax)
    q = torch.floor(xf / scale[..., None] + 0.5).add_(zero[..., None]).clamp_(0.0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.to(param_dtype), zero.to(param_dtype)


def dequantize_kv(codes: Tensor, scales: Tensor, zeros: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """Invert :func:`quantize_kv` (up to its rounding): ``(q - zero) * scale`` in fp32, cast to ``dtype``."""
    q = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2) if bits == 4 else codes
    x = (q.float() - zeros.float()[..., None]) * scales.float()[..., None]
    return x.to(dtype)


def write_kv_torch(cache: PagedKV, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Write ``k``/``v`` ``[N, kv_heads, head_dim]`` into a layer's slots (the torch reference path).

    Slots of ``-1`` are skipped. Quantized caches quantize with :func:`quantize_kv`.
    """
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slots = slot_mapping.to(device=cache.keys.device, dtype=torch.long)
    for (codes, scales, zeros), x in zip(cache.planes(), (k, v), strict=True):
        if cache.bits is None:
            codes.index_copy_(0, slots, x.to(codes.dtype))
            continue
        assert scales is not None and zeros is not None
        q, s, z = quantize_kv(x, cache.bits, scales.dtype)
        codes.index_copy_(0, slots, q)
        scales.index_copy_(0, slots, s)
        zeros.index_copy_(0, slots, z)


def _kv_write_kernel(
    src_ptr,
    slot_ptr,
    dst_ptr,
    scale_ptr,
    zero_ptr,
    num_heads,
    head_dim,
    src_s0,
    src_s1,
    dst_s0,
    dst_s1,
    par_s0,
    par_s1,
    eps,
    QMAX: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: all its kv heads at once ([BLOCK_H, BLOCK_D] tile).
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    # Slot -1 (skip): no valid head. Folded into the bound because the interpreter mishandles
    # `vector & scalar` boolean masks.
    row_ok = h < tl.where(slot >= 0, num_heads, 0)
    src_row = src_ptr + tok.to(tl.int64) * src_s0 + h[:, None] * src_s1
    dst_row = dst_ptr + slot * dst_s0 + h[:, None] * dst_s1
    if BITS == 0:
        d = tl.arange(0, BLOCK_D)[None, :]
        m = row_ok[:, None] & (d < head_dim)
        x = tl.load(src_row + d, mask=m)
        tl.store(dst_row + d, x.to(dst_ptr.dtype.element_ty), mask=m)
    else:
        if BITS == 8:
            d = tl.arange(0, BLOCK_D)[None, :]
            m = row_ok[:, None] & (d < head_dim)
            x = tl.load(src_row + d, mask=m, other=0.0).to(tl.float32)
            lo = tl.minimum(tl.min(x, axis=1), 0.0)
            hi = tl.maximum(tl.max(x, axis=1), 0.0)
        else:
            # int4: BLOCK_D covers head_dim // 2 byte columns; element 2j -> low nibble of byte j.
            j = tl.arange(0, BLOCK_D)[None, :]
            m = row_ok[:, None] & (j < head_dim // 2)
            xe = tl.load(src_row + 2 * j, mask=m, other=0.0).to(tl.float32)
            xo = tl.load(src_row + 2 * j + 1, mask=m, other=0.0).to(tl.float32)
            lo = tl.minimum(tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1)), 0.0)
            hi = tl.maximum(tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1)), 0.0)
        # Padding lanes load 0, which the range holds anyway, so they do not change lo/hi.
        scale = tl.maximum((hi - lo) / QMAX, eps)
        scale = scale.to(scale_ptr.dtype.element_ty).to(tl.float32)  # quantize with the stored scale
        zero = tl.minimum(tl.maximum(tl.floor(-lo / scale + 0.5), 0.0), QMAX)
        if BITS == 8:
            q = tl.floor(x / scale[:, None] + 0.5) + zero[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), QMAX)
            tl.store(dst_row + d, q.to(tl.uint8), mask=m)
        else:
            qe = tl.minimum(tl.maximum(tl.floor(xe / scale[:, None] + 0.5) + zero[:, None], 0.0), QMAX)
            qo = tl.minimum(tl.maximum(tl.floor(xo / scale[:, None] + 0.5) + zero[:, None], 0.0), QMAX)
            byte = qe.to(tl.int32) | (qo.to(tl.int32) << 4)
            tl.store(dst_row + j, byte.to(tl.uint8), mask=m)
        par = slot * par_s0 + h * par_s1
        tl.store(scale_ptr + par, scale.to(scale_ptr.dtype.element_ty), mask=row_ok)
        tl.store(zero_ptr + par, zero.to(zero_ptr.dtype.element_ty), mask=row_ok)


def _check_write(cache: PagedKV, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise InferError(
            f"write_kv takes k and v of one shape [N, kv_heads, head_dim], got {tuple(k.shape)} and "
            f"{tuple(v.shape)}."
        )
    if cache.keys.dim() != 3:
        raise InferError(
            f"write_kv takes one layer's cache (3-D), got {cache.keys.dim()}-D: use cache.layer(i)."
        )
    if k.shape[1] != cache.keys.shape[1] or k.shape[2] != cache.head_dim:
        raise InferError(
            f"k has {k.shape[1]} heads of {k.shape[2]} but the cache holds {cache.keys.shape[1]} heads "
            f"of {cache.head_dim}."
        )
    if slot_mapping.shape != (k.shape[0],):
        raise InferError(
            f"slot_mapping must be [{k.shape[0]}] (one slot a token), got {tuple(slot_mapping.shape)}."
        )


def write_kv(cache: PagedKV, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Write ``k``/``v`` ``[N, kv_heads, head_dim]`` into a layer's slots with the Triton kernel.

    Same contract as :func:`write_kv_torch` (slots of ``-1`` skipped, quantize on write), and
    bit-identical codes, scales and zero points to it in the interpreter.

    Raises:
        InferError: On inconsistent shapes or cache tensors.
        KernelUnavailableError: Without triton, or on CPU tensors outside the interpreter.
    """
    _check_write(cache, k, v, slot_mapping)
    cache.validate()
    check_device(k, v, cache.keys)
    n, num_heads, head_dim = k.shape
    if n == 0:
        return
    kernel = jit_kernel(_kv_write_kernel)
    bits = cache.bits or 0
    block_d = next_power_of_2(head_dim // 2 if bits == 4 else head_dim)
    for (codes, scales, zeros), x in zip(cache.planes(), (k, v), strict=True):
        if x.stride(2) != 1:
            x = x.contiguous()
        if bits:
            assert scales is not None and zeros is not None
            par, zer, ps0, ps1 = scales, zeros, scales.stride(0), scales.stride(1)
            if zeros.stride() != scales.stride():
                raise InferError("scales and zero points must share one memory layout.")
            eps = _param_eps(scales.dtype)
        else:  # unused pointers: pass the codes tensor, the kernel never reads them
            par, zer, ps0, ps1, eps = codes, codes, 0, 0, 1.0
        if codes.stride(2) != 1:
            raise InferError("the cache's last dimension must be contiguous.")
        kernel[(n,)](
            x,
            slot_mapping,
            codes,
            par,
            zer,
            num_heads,
            head_dim,
            x.stride(0),
            x.stride(1),
            codes.stride(0),
            codes.stride(1),
            ps0,
            ps1,
            eps,
            QMAX=float((1 << bits) - 1) if bits else 1.0,
            BITS=bits,
            BLOCK_H=next_power_of_2(num_heads),
            BLOCK_D=block_d,
        )
