"""Weight-only quantized linear layers: int8 per-channel and int4 group-wise, activations in float.

A :class:`WeightOnlyLinear` replaces one projection, or several fused side by side (q/k/v, gate/up),
and multiplies with the fastest kernel the device has for its weights:

* int8 on CPU: ``torch._weight_int8pack_mm`` over the plain ``[out, in]`` int8 matrix and one scale
  per output row; float32 inputs of up to four rows (decoding) take lmstack-core's int8 GEMV
  (``cpu_kernels.gemv_int8``) over the same matrix instead, in exact float32;
* int4 on CPU: ``torch._weight_int4pack_mm_for_cpu`` over the weight repacked once by
  ``torch._convert_weight_to_int4pack_for_cpu`` (needs ``out % 16 == 0`` and a group size of 32, 64,
  128 or 256; other shapes take the fallback);
* elsewhere, and the fallback: the weight is dequantized to the activations' dtype and multiplied
  with ``F.linear``. int4 weights are kept in the AutoAWQ GEMM layout there, the layout the Triton
  W4A16 kernel reads: :func:`_w4a16_gemm` calls that kernel on CUDA.

The CPU kernels take their activations in bfloat16 by default (``kernel_dtype``), whatever the
model's dtype: in torch 2.13 (measured on this 2-core AVX-512 machine, one thread, 512x2816) their
bfloat16 path is vectorized and their float32/float16 paths are not — batch 1: int8 41 us and int4
44 us with bfloat16 activations against 2588 us and 6665 us with float32 ones (1106/2245 us fp16),
and 81 us for the float32 ``F.linear``. So a float32 model's quantized layers round their inputs,
scales and outputs to bfloat16 (relative 2**-9 each); ``kernel_dtype=None`` keeps the model's
dtype (exact float32 arithmetic over the dequantized weights, but 30-150x slower on CPU).

Fusing: codes are per output row (int8) or per (output row, input group) (int4), so quantizing a
fused ``[q; k; v]`` matrix gives exactly the codes of quantizing q, k and v one by one and stacking
them. Modules are therefore always built fused (one kernel call instead of three or two); the
projections are split again only when saving (``state_dict``), which writes each Hugging Face
projection under its own name in the checkpoint layout (AutoAWQ GEMM for 4 bits, GPTQ for 8).

Measured speeds are in :mod:`lmstack.infer.quant` (the package docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core.model import cpu_kernels
from lmstack.infer._errors import InferError
from lmstack.infer.quant._packing import GroupQuant, dequantize_groupwise, pack_awq, unpack_awq

__all__ = ["WeightOnlyLinear", "int4_cpu_supported"]

logger = logging.getLogger(__name__)

Kernel = Literal["int8_cpu", "int8_dense", "int4_cpu", "int4_awq"]

# The input sizes torch's CPU int8 kernel handles (see from_int8).
_INT8_CPU_IN_MULTIPLE = 16
# Group sizes torch's CPU int4 kernel accepts, and the output multiple its packing needs.
_INT4_CPU_GROUPS = (32, 64, 128, 256)
_INT4_CPU_OUT_MULTIPLE = 16
# Rows of the identity matrix per call when reading int4 codes back out of the CPU packing.
_UNPACK_ROWS = 256


def int4_cpu_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether torch's packed CPU int4 kernel takes a weight of this shape and group size."""
    return (
        group_size in _INT4_CPU_GROUPS
        and out_features % _INT4_CPU_OUT_MULTIPLE == 0
        and in_features % group_size == 0
        and hasattr(torch, "_weight_int4pack_mm_for_cpu")
    )


def _w4a16_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor | None:
    """The GPU W4A16 GEMM over AutoAWQ GEMM tensors, or None where no kernel applies (then: dequantize).

    The Triton W4A16 kernel (:func:`lmstack.infer.kernels.w4a16_gemm`) on CUDA when triton is installed
    (it unpacks the nibbles in the kernel); None elsewhere, where the weight is dequantized instead.
    """
    if not x.is_cuda or group_size % 32:
        return None
    from lmstack.infer.kernels import triton_available, w4a16_gemm

    if not triton_available():
        return None
    return w4a16_gemm(x, qweight, qzeros, scales)


class WeightOnlyLinear(nn.Module):
    """A frozen linear layer over int8 or int4 weights, from one or more projections fused by rows.

    Build it with :meth:`from_int8` or :meth:`from_groups`. ``state_dict()`` writes each projection
    under its Hugging Face name in the checkpoint layout (4 bits: AutoAWQ GEMM ``qweight`` /
    ``qzeros`` / ``scales``; 8 bits: GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``), so
    :func:`~lmstack.core.save_pretrained` writes a quantized checkpoint; loading a state dict into it
    is refused (use :func:`~lmstack.infer.quant.load_quantized`). Inference only.

    Attributes:
        names: The Hugging Face projections it holds, in output order.
        sizes: Their output sizes.
        attr: The attribute name it is registered under in its parent module.
        bits: 8 (per-channel, symmetric) or 4 (group-wise, asymmetric).
        group_size: Input columns per group (4 bits); ``in_features`` for int8.
        kernel: How it multiplies: ``int8_cpu``, ``int8_dense``, ``int4_cpu`` or ``int4_awq``.
        kernel_dtype: The activations' dtype inside the CPU kernels (the output comes back in the
            input's dtype).
        perm: For GPTQ act-order checkpoints, the input-column order the groups follow (else None).
    """

    # Tells CausalLM.prepare_for_inference that this module is already laid out for inference.
    inference_ready: ClassVar[bool] = True

    bias: Tensor | None
    perm: Tensor | None
    # Buffers; which exist depends on the kernel (see the constructors).
    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    scales_zeros: Tensor
    kernel_scales: Tensor

    def __init__(
        self,
        names: Sequence[str],
        sizes: Sequence[int],
        attr: str,
        in_features: int,
        bits: int,
        group_size: int,
        kernel: Kernel,
        buffers: dict[str, Tensor],
        bias: Tensor | None,
        perm: Tensor | None = None,
        kernel_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.names, self.sizes, self.attr = list(names), list(sizes), attr
        self.in_features, self.out_features = in_features, sum(sizes)
        self.bits, self.group_size, self.kernel, self.kernel_dtype = bits, group_size, kernel, kernel_dtype
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.eval()

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_int8(
        cls,
        q: Tensor,
        scales: Tensor,
        *,
        names: Sequence[str],
        sizes: Sequence[int],
        attr: str,
        dtype: torch.dtype,
        bias: Tensor | None = None,
        kernel_dtype: torch.dtype | None = torch.bfloat16,
    ) -> WeightOnlyLinear:
        """Symmetric per-channel int8: ``W = q * scales[:, None]``.

        Args:
            q: ``[out, in]`` int8 codes in ``[-127, 127]`` (or ``-128``), on the target device.
            scales: ``[out]`` scales.
            names: The projections' names.
            sizes: Their output sizes (summing to ``out``).
            attr: The attribute name in the parent module.
            dtype: The activations' dtype (the model's).
            bias: Optional ``[out]`` bias.
            kernel_dtype: Activation dtype inside the CPU kernel (None: ``dtype``); see the module doc.
        """
        _check_parts(names, sizes, q.shape[0])
        kdt = kernel_dtype or dtype
        # torch 2.13's int8 CPU kernel crashes (SIGSEGV) on bfloat16 inputs of several rows when the
        # input size is not a multiple of 16 (seen at 24, 72, 100, 136; float32 and float16 run):
        # such weights are dequantized instead.
        cpu_ok = q.device.type == "cpu" and (kdt != torch.bfloat16 or q.shape[1] % _INT8_CPU_IN_MULTIPLE == 0)
        kernel: Kernel = "int8_cpu" if cpu_ok else "int8_dense"
        buffers = {
            "qweight": q.to(torch.int8).contiguous(),
            "scales": scales.to(torch.float32).contiguous(),  # exact: what dense_weight and saving use
            "kernel_scales": scales.to(kdt if kernel == "int8_cpu" else dtype).contiguous(),
        }
        b = None if bias is None else bias.to(dtype)
        return cls(names, sizes, attr, q.shape[1], 8, q.shape[1], kernel, buffers, b, None, kdt)

    @classmethod
    def from_groups(
        cls,
        quant: GroupQuant,
        *,
        names: Sequence[str],
        sizes: Sequence[int],
        attr: str,
        dtype: torch.dtype,
        bias: Tensor | None = None,
        perm: Tensor | None = None,
        kernel_dtype: torch.dtype | None = torch.bfloat16,
    ) -> WeightOnlyLinear:
        """Group-wise asymmetric 4-bit: ``W[:, g] = (q[:, g] - zeros[:, g]) * scales[:, g]``.

        Args:
            quant: The codes (``[out, in]``, on the target device) with their scales and zero points.
            names: The projections' names.
            sizes: Their output sizes.
            attr: The attribute name in the parent module.
            dtype: The activations' dtype.
            bias: Optional ``[out]`` bias.
            perm: GPTQ act-order: ``perm[j]`` is the input column that group column ``j`` stands for
                (``quant`` is then over ``x[..., perm]``).
            kernel_dtype: Activation dtype inside the CPU kernel (None: ``dtype``); see the module doc.
        """
        if quant.bits != 4:
            raise InferError(f"WeightOnlyLinear.from_groups takes 4-bit codes, got {quant.bits}-bit ones.")
        out_f, in_f = quant.q.shape
        _check_parts(names, sizes, out_f)
        device = quant.q.device
        b = None if bias is None else bias.to(dtype)
        kdt = kernel_dtype or dtype
        if device.type == "cpu" and int4_cpu_supported(out_f, in_f, quant.group_size):
            packed = torch._convert_weight_to_int4pack_for_cpu(quant.q.to(torch.int32).contiguous(), 2)
            scales = quant.scales.to(torch.float32).t()  # [groups, out]
            # The kernel computes (q - 8) * scale + zero; ours is (q - z) * scale = (q - 8) * s + (8 - z) * s.
            zero = (8.0 - quant.zeros.to(torch.float32).t()) * scales
            buffers = {
                "qweight": packed,
                "scales_zeros": torch.stack([scales, zero], -1).to(kdt).contiguous(),
                # Kept (small: one value per group) so the module saves its exact scales and zeros.
                "scales": quant.scales.to(torch.float32).contiguous(),
                "qzeros": quant.zeros.contiguous(),
            }
            return cls(names, sizes, attr, in_f, 4, quant.group_size, "int4_cpu", buffers, b, perm, kdt)
        if out_f % 8 or quant.zeros.max() > 15:
            # AWQ's layout holds 8 output columns per int32 and zero points 0..15.
            raise InferError(
                f"cannot hold a 4-bit weight with {out_f} outputs and zero points up to "
                f"{int(quant.zeros.max())} on {device}: it needs a multiple of 8 outputs and zero points "
                "in 0..15."
            )
        qweight, qzeros, scales16 = pack_awq(quant)
        buffers = {"qweight": qweight, "qzeros": qzeros, "scales": scales16.to(dtype)}
        return cls(names, sizes, attr, in_f, 4, quant.group_size, "int4_awq", buffers, b, perm, dtype)

    # -- compute ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T + b`` over the last dimension, ``[..., in]`` to ``[..., out]``."""
        if self.training:
            raise InferError("a weight-only quantized linear is inference only; call model.eval().")
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel in ("int8_cpu", "int8_dense") and cpu_kernels.few_rows(x2):
            # Decoding in float32: lmstack-core's int8 GEMV, exact float32 over the dequantized weight
            # and as fast as torch's bfloat16 kernel at one row (2.3 ms a step on the 56M llama).
            y = cpu_kernels.gemv_int8(x2, self.qweight, self.scales)
        elif self.kernel == "int8_cpu":
            xk = x2.to(self.kernel_dtype).contiguous()
            y = torch._weight_int8pack_mm(xk, self.qweight, self.kernel_scales).to(x.dtype)
        elif self.kernel == "int4_cpu":
            xk = x2.to(self.kernel_dtype).contiguous()
            y = torch._weight_int4pack_mm_for_cpu(xk, self.qweight, self.group_size, self.scales_zeros)
            y = y.to(x.dtype)
        elif self.kernel == "int4_awq":
            fast = _w4a16_gemm(x2, self.qweight, self.qzeros, self.scales, self.group_size)
            y = fast if fast is not None else F.linear(x2, self.dense_weight(x.dtype))
        else:
            y = F.linear(x2, self.dense_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    # -- the codes ----------------------------------------------------------------------------------
    def int8_codes(self) -> tuple[Tensor, Tensor]:
        """``(q, scales)`` of an int8 module: ``[out, in]`` int8 and ``[out]`` float32."""
        if self.bits != 8:
            raise InferError(f"int8_codes() on a {self.bits}-bit module; use group_codes().")
        return self.qweight, self.scales

    def group_codes(self) -> GroupQuant:
        """The 4-bit codes, scales and zero points (``[out, in]`` codes over ``x[..., perm]``)."""
        if self.bits != 4:
            raise InferError(f"group_codes() on a {self.bits}-bit module; use int8_codes().")
        if self.kernel == "int4_awq":
            return unpack_awq(self.qweight, self.qzeros, self.scales)
        # Read the codes back through the kernel itself: with scale 1 and zero 0 it returns q - 8
        # exactly, whatever its private packing is.
        unit = torch.zeros(self.in_features // self.group_size, self.out_features, 2)
        unit[..., 0] = 1.0
        rows = []
        for start in range(0, self.in_features, _UNPACK_ROWS):
            eye = torch.eye(self.in_features, dtype=torch.float32)[start : start + _UNPACK_ROWS]
            rows.append(torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, unit))
        q = (torch.cat(rows).t() + 8.0).round().to(torch.uint8)  # [out, in]
        scales, zeros = self.scales.clone(), self.qzeros.clone()
        return GroupQuant(q.contiguous(), scales, zeros, 4, self.group_size)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized ``[out, in]`` weight (over ``x[..., perm]`` for act-order modules)."""
        if self.bits == 8:
            q, scales = self.int8_codes()
            return (q.to(torch.float32) * scales.unsqueeze(-1)).to(dtype)
        quant = self.group_codes()
        return dequantize_groupwise(quant.q, quant.scales, quant.zeros, quant.group_size, dtype)

    def weight_bytes(self) -> int:
        """Bytes held by the weight and its quantization parameters (the bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n not in ("bias", "perm"))

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes, strict=True))
        return (
            f"in_features={self.in_features}, {parts}, bits={self.bits}, group_size={self.group_size}, "
            f"kernel={self.kernel}, kernel_dtype={str(self.kernel_dtype).replace('torch.', '')}, "
            f"bias={self.bias is not None}"
        )

    # -- checkpoint view ------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Each projection's tensors in the checkpoint layout, keyed ``"<name>.<tensor>"``.

        4 bits: AutoAWQ GEMM (``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/group,
        out/8]``, ``scales`` fp16 ``[in/group, out]``). 8 bits: GPTQ (``qweight`` int32 ``[in/4, out]``
        of unsigned codes ``q + 128``, ``qzeros`` of 127 (GPTQ's stored ``zero - 1``), ``scales`` fp16
        ``[1, out]``, ``g_idx`` zeros).

        Raises:
            InferError: An act-order (GPTQ ``desc_act``) module, which the AWQ layout cannot express.
        """
        out: dict[str, Tensor] = {}
        biases = self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        if self.bits == 8:
            q, scales = self.int8_codes()
            for name, qp, sp, bp in zip(
                self.names, q.split(self.sizes), scales.split(self.sizes), biases, strict=True
            ):
                out.update({f"{name}.{k}": v for k, v in gptq8_pack(qp, sp).items()})
                if bp is not None:
                    out[f"{name}.bias"] = bp
            return out
        if self.perm is not None:
            raise InferError(
                "this layer came from a GPTQ act-order (desc_act) checkpoint; the AWQ layout has no "
                "column order, so it cannot be saved as AWQ. Re-quantize from the float model instead."
            )
        quant = self.group_codes()
        if int(quant.zeros.max()) > 15:
            raise InferError(
                "this layer has a zero point of 16 (a GPTQ v1 checkpoint's zero of 0), which the AWQ "
                "layout cannot store; re-quantize from the float model instead."
            )
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        for i, name in enumerate(self.names):
            rows = slice(offsets[i], offsets[i + 1])
            part = GroupQuant(quant.q[rows], quant.scales[rows], quant.zeros[rows], 4, quant.group_size)
            qweight, qzeros, scales = pack_awq(part)
            out.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales})
            if biases[i] is not None:
                out[f"{name}.bias"] = biases[i]  # type: ignore[assignment]
        return out

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # ``prefix`` ends in "<attr>."; the projections it replaced were siblings of this module.
        parent = prefix[: len(prefix) - len(self.attr) - 1]
        for key, tensor in self.checkpoint_tensors().items():
            destination[f"{parent}{key}"] = tensor.detach()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise InferError(
            "cannot load a state dict into a quantized layer; load the checkpoint with "
            "lmstack.infer.quant.load_quantized(path)."
        )


def _check_parts(names: Sequence[str], sizes: Sequence[int], out_features: int) -> None:
    if not names or len(names) != len(sizes) or sum(sizes) != out_features:
        raise InferError(
            f"projection names {list(names)} and sizes {list(sizes)} do not describe {out_features} outputs."
        )


# -- GPTQ's layout (8-bit writer; 4/8-bit reader in _checkpoint) -------------------------------------
def gptq8_pack(q: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """Symmetric per-channel int8 codes in GPTQ's layout (bits 8, group_size -1, sym, v1 zeros).

    Args:
        q: ``[out, in]`` int8 codes.
        scales: ``[out]`` scales.

    Returns:
        ``qweight`` int32 ``[in/4, out]`` (four unsigned codes ``q + 128`` per int32, input row ``4r + i``
        in bits ``8i .. 8i+7``), ``qzeros`` int32 ``[1, out/4]`` (127 = GPTQ's stored ``zero - 1``
        for the symmetric zero 128, packed the same way along outputs), ``scales`` fp16 ``[1, out]``
        and ``g_idx`` int32 ``[in]`` (all group 0).
    """
    out_f, in_f = q.shape
    if in_f % 4 or out_f % 4:
        raise InferError(f"GPTQ 8-bit packing needs in and out features divisible by 4, got {out_f}x{in_f}.")
    codes = (q.to(torch.int64) + 128).t()  # [in, out], unsigned
    zeros = torch.full((1, out_f), 127, dtype=torch.int64, device=q.device)
    return {
        "qweight": pack_rows(codes, 8),
        "qzeros": pack_rows(zeros.t(), 8).t().contiguous(),
        "scales": scales.to(torch.float16).reshape(1, out_f),
        "g_idx": torch.zeros(in_f, dtype=torch.int32, device=q.device),
    }


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``[rows, cols]`` unsigned codes along rows, GPTQ style: ``[rows * bits / 32, cols]`` int32.

    Code ``r`` of each run of ``32 / bits`` rows sits in bits ``bits*i ..`` with ``i = r % (32/bits)``.
    """
    per = 32 // bits
    rows, cols = codes.shape
    if rows % per:
        raise InferError(f"GPTQ packing of {bits}-bit codes needs a multiple of {per} rows, got {rows}.")
    c = codes.to(torch.int64).reshape(rows // per, per, cols)
    shifts = (torch.arange(per, dtype=torch.int64, device=codes.device) * bits).reshape(1, per, 1)
    packed = (c << shifts).sum(1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_rows`: ``[n, cols]`` int32 to ``[n * 32 / bits, cols]`` int64 codes."""
    per = 32 // bits
    n, cols = packed.shape
    shifts = (torch.arange(per, dtype=torch.int64, device=packed.device) * bits).reshape(1, per, 1)
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(n * per, cols)
