"""Weight quantization arithmetic and the AutoAWQ GEMM storage layout.

Everything here is plain tensor math with no model in sight, shared by round-to-nearest, AWQ's
search, the weight-only linear modules, the checkpoint reader/writer and the Triton W4A16 kernel's
reference.

Conventions:

* A weight is ``[out_features, in_features]`` (``nn.Linear``'s layout). Group-wise quantization cuts
  each output row into groups of ``group_size`` consecutive input columns; each (row, group) has one
  scale and one zero point.
* Asymmetric ``bits``-bit codes ``q`` in ``[0, 2**bits - 1]`` stand for ``(q - zero) * scale``.
* The AutoAWQ "GEMM" layout, which transformers, vLLM and AutoAWQ read for
  ``quantization_config = {"quant_method": "awq", "version": "gemm", "bits": 4, ...}``, stores the
  transposed matrix: ``qweight`` int32 ``[in, out / 8]``, ``qzeros`` int32 ``[in / group, out / 8]``
  and ``scales`` fp16 ``[in / group, out]``. Eight 4-bit codes share one int32, and not in column
  order: nibble ``i`` (bits ``4i .. 4i+3``) of packed column ``c`` holds output column
  ``8c + AWQ_ORDER[i]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmstack.infer._errors import InferError

__all__ = [
    "AWQ_ORDER",
    "GroupQuant",
    "dequantize_groupwise",
    "fake_quantize",
    "pack_awq",
    "quantize_groupwise",
    "quantize_int8_per_channel",
    "unpack_awq",
]

# Nibble i of an AutoAWQ int32 holds column AWQ_ORDER[i] of its group of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The nibble that holds column j: the inverse permutation of AWQ_ORDER.
_AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(j) for j in range(8))


class GroupQuant:
    """Group-wise asymmetric codes of one weight: ``w ≈ (q - zeros) * scales`` group by group.

    Attributes:
        q: ``[out, in]`` uint8 codes in ``[0, 2**bits - 1]``.
        scales: ``[out, in / group_size]`` float32.
        zeros: ``[out, in / group_size]`` uint8 zero points (codes, so exactly representable).
        bits: Bits per code.
        group_size: Input columns per group.
    """

    __slots__ = ("bits", "group_size", "q", "scales", "zeros")

    def __init__(self, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> None:
        self.q, self.scales, self.zeros, self.bits, self.group_size = q, scales, zeros, bits, group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[out, in]`` weight these codes stand for."""
        return dequantize_groupwise(self.q, self.scales, self.zeros, self.group_size, dtype)


def _check_groups(w: Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise InferError(f"group-wise quantization takes a 2-D [out, in] weight, got shape {tuple(w.shape)}.")
    if bits not in (2, 3, 4, 8):
        raise InferError(f"unsupported bit width {bits}; use 4 or 8 (2 and 3 for experiments).")
    if group_size <= 0 or w.shape[1] % group_size:
        raise InferError(
            f"in_features {w.shape[1]} is not a multiple of group_size {group_size}; choose a group size "
            f"that divides it (e.g. 128, 64 or 32)."
        )


def quantize_groupwise(
    w: Tensor, bits: int = 4, group_size: int = 128, *, clip: Tensor | None = None
) -> GroupQuant:
    """Round-to-nearest asymmetric quantization, one scale and zero point per group.

    Args:
        w: ``[out, in]`` weight.
        bits: Bits per code.
        group_size: Input columns per group; must divide ``in``.
        clip: Optional ``[out, in / group_size]`` maximum absolute value per group (AWQ's clipping
            search): the group's range is first clamped to ``[-clip, clip]``.

    Returns:
        The codes with their scales and zero points.
    """
    _check_groups(w, bits, group_size)
    out_f, in_f = w.shape
    qmax = 2**bits - 1
    g = w.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    if clip is not None:
        c = clip.to(torch.float32).unsqueeze(-1)
        g = g.clamp(-c, c)
    lo = g.amin(-1).clamp(max=0.0)  # the range always holds 0, so zero is exact
    hi = g.amax(-1).clamp(min=0.0)
    scales = ((hi - lo) / qmax).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    q = torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, qmax).to(torch.uint8).reshape(out_f, in_f)
    return GroupQuant(q, scales, zeros.to(torch.uint8), bits, group_size)


def dequantize_groupwise(
    q: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q - zeros) * scales`` group by group, as an ``[out, in]`` matrix in ``dtype``."""
    out_f, in_f = q.shape
    g = q.to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    w = (g - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f).to(dtype)


def fake_quantize(w: Tensor, bits: int = 4, group_size: int = 128, *, clip: Tensor | None = None) -> Tensor:
    """Quantize and dequantize ``w`` (same shape and dtype): what the quantized layer will compute with."""
    return quantize_groupwise(w, bits, group_size, clip=clip).dequantize(w.dtype)


def quantize_int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8, one scale per output row: ``w ≈ q * scales[:, None]``.

    Returns:
        ``(q, scales)``: ``[out, in]`` int8 and ``[out]`` float32.
    """
    if w.dim() != 2:
        raise InferError(f"int8 quantization takes a 2-D [out, in] weight, got shape {tuple(w.shape)}.")
    w32 = w.detach().to(torch.float32)
    scales = (w32.abs().amax(-1) / 127.0).clamp(min=1e-8)
    q = torch.round(w32 / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scales


def _pack_nibbles(codes: Tensor) -> Tensor:
    """``[rows, cols]`` 4-bit codes → ``[rows, cols / 8]`` int32 in AutoAWQ's nibble order."""
    rows, cols = codes.shape
    if cols % 8:
        raise InferError(f"AWQ packing needs a multiple of 8 output columns, got {cols}.")
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    packed = (c << shifts).sum(-1)  # distinct nibbles: the sum is the bitwise or
    # Reinterpret the unsigned 32-bit pattern as int32 (the dtype the checkpoints store).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`_pack_nibbles`: ``[rows, n]`` int32 → ``[rows, 8 n]`` uint8 codes."""
    rows, n = packed.shape
    shifts = torch.tensor([4 * i for i in _AWQ_NIBBLE_OF_COLUMN], dtype=torch.int64, device=packed.device)
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(rows, n * 8).to(torch.uint8)


def pack_awq(quant: GroupQuant) -> tuple[Tensor, Tensor, Tensor]:
    """Store 4-bit group codes in the AutoAWQ GEMM layout.

    Returns:
        ``(qweight, qzeros, scales)``: int32 ``[in, out / 8]``, int32 ``[in / group, out / 8]`` and
        fp16 ``[in / group, out]``.
    """
    if quant.bits != 4:
        raise InferError(f"the AWQ GEMM layout stores 4-bit codes, got {quant.bits}-bit ones.")
    qweight = _pack_nibbles(quant.q.t())
    qzeros = _pack_nibbles(quant.zeros.t())
    scales = quant.scales.t().contiguous().to(torch.float16)
    return qweight, qzeros, scales


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> GroupQuant:
    """Read the AutoAWQ GEMM layout back into ``[out, in]`` codes (see :func:`pack_awq`)."""
    in_f = qweight.shape[0]
    groups = qzeros.shape[0]
    if scales.shape[0] != groups or in_f % groups:
        raise InferError(
            f"inconsistent AWQ tensors: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}."
        )
    q = _unpack_nibbles(qweight).t().contiguous()
    zeros = _unpack_nibbles(qzeros).t().contiguous()
    return GroupQuant(q, scales.t().to(torch.float32).contiguous(), zeros, 4, in_f // groups)
