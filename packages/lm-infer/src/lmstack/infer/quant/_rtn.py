"""Replacing a model's projections with weight-only quantized ones (round-to-nearest)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmstack.core import CausalLM
from lmstack.infer._errors import InferError
from lmstack.infer.quant._linear import WeightOnlyLinear
from lmstack.infer.quant._packing import GroupQuant, quantize_groupwise, quantize_int8_per_channel

__all__ = ["FUSED_GROUPS", "quantize_model", "replace_projections"]

logger = logging.getLogger(__name__)

# (submodule of a decoder layer, fused attribute, projections fused into it, output projection).
FUSED_GROUPS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj"), "down_proj"),
)

Part = tuple[str, Tensor, Tensor | None]  # (name, [out, in] weight, bias)


def _parts_of(parent: nn.Module, names: Sequence[str], fused: str | None) -> list[Part] | None:
    """The float projections ``names`` of ``parent`` (plain or fused by prepare_for_inference)."""
    module = getattr(parent, fused, None) if fused else None
    if module is None and len(names) == 1 and _is_inference_linear(getattr(parent, names[0], None)):
        module = getattr(parent, names[0])  # an output projection prepare_for_inference laid out
    if module is None:
        mods = [getattr(parent, n, None) for n in names]
        if any(isinstance(m, WeightOnlyLinear) for m in mods):
            return None  # already quantized
        if not all(isinstance(m, nn.Linear) for m in mods):
            raise InferError(
                f"cannot quantize {type(parent).__name__}.{'/'.join(names)}: expected nn.Linear projections, "
                f"got {[type(m).__name__ for m in mods]}; merge adapters first."
            )
        linears = [m for m in mods if isinstance(m, nn.Linear)]
        return [
            (n, m.weight.detach(), None if m.bias is None else m.bias.detach())
            for n, m in zip(names, linears, strict=True)
        ]
    if isinstance(module, WeightOnlyLinear):
        return None
    # An InferenceLinear from prepare_for_inference: split its dense weight back by projection.
    weights = module.dense_weight().split(module.sizes)
    biases = module.bias.split(module.sizes) if module.bias is not None else [None] * len(module.sizes)
    return list(zip(module.names, weights, biases, strict=True))


def _is_inference_linear(module: object) -> bool:
    # core's InferenceLinear (not exported): a fused float projection with a dense_weight() view.
    return type(module).__name__ == "InferenceLinear" and hasattr(module, "dense_weight")


def replace_projections(
    model: CausalLM, make: Callable[[list[Part], str], WeightOnlyLinear], *, progress: bool | None = None
) -> None:
    """Swap every decoder layer's projections for the modules ``make(parts, attr)`` builds, fused.

    q/k/v become ``self_attn.qkv_proj`` and gate/up ``mlp.gate_up_proj`` (the attributes core's
    forward uses after :meth:`~lmstack.core.CausalLM.prepare_for_inference`); o and down stay alone.
    """
    for layer in tqdm(model.model.layers, desc="Quantizing", unit="layer", disable=_hide(progress)):
        for sub, fused, names, out in FUSED_GROUPS:
            parent = getattr(layer, sub)
            parts = _parts_of(parent, names, fused)
            if parts is not None:
                for n in names:
                    if n in parent._modules:
                        delattr(parent, n)
                if fused in parent._modules:
                    delattr(parent, fused)
                setattr(parent, fused, make(parts, fused))
            out_parts = _parts_of(parent, (out,), None)
            if out_parts is not None:
                delattr(parent, out)
                setattr(parent, out, make(out_parts, out))


def _hide(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _int8_module(
    parts: list[Part], attr: str, dtype: torch.dtype, kdt: torch.dtype | None
) -> WeightOnlyLinear:
    w = torch.cat([p[1] for p in parts])
    q, scales = quantize_int8_per_channel(w)
    # fp16 scales: what the GPTQ checkpoint stores, so the saved model computes exactly as this one.
    scales = scales.to(torch.float16).to(torch.float32)
    return WeightOnlyLinear.from_int8(
        q, scales, names=[p[0] for p in parts], sizes=[p[1].shape[0] for p in parts], attr=attr, dtype=dtype,
        bias=_cat_bias(parts), kernel_dtype=kdt,
    )  # fmt: skip


def _int4_module(
    parts: list[Part], attr: str, dtype: torch.dtype, group_size: int, kdt: torch.dtype | None
) -> WeightOnlyLinear:
    w = torch.cat([p[1] for p in parts])
    quant = quantize_groupwise(w, 4, group_size)
    # fp16 scales: what the AWQ checkpoint stores (zero points are integer codes, exact either way).
    quant = GroupQuant(quant.q, quant.scales.to(torch.float16).to(torch.float32), quant.zeros, 4, group_size)
    return WeightOnlyLinear.from_groups(
        quant, names=[p[0] for p in parts], sizes=[p[1].shape[0] for p in parts], attr=attr, dtype=dtype,
        bias=_cat_bias(parts), kernel_dtype=kdt,
    )  # fmt: skip


def _cat_bias(parts: list[Part]) -> Tensor | None:
    biases = [p[2] for p in parts]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [b if b is not None else torch.zeros_like(p[1][:, 0]) for b, p in zip(biases, parts, strict=True)]
    )


@torch.no_grad()
def quantize_model(
    model: CausalLM,
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 128,
    *,
    lm_head: bool = False,
    kernel_dtype: torch.dtype | None = torch.bfloat16,
    tokenizer: Any = None,
    texts: Any = None,
    progress: bool | None = None,
    **awq_options: Any,
) -> CausalLM:
    """Quantize the weights of every decoder layer's projections, in place (weight-only).

    ``bits=8``: symmetric int8 with one scale per output row (per-channel). ``bits=4``: asymmetric
    4-bit with a scale and zero point per ``group_size`` input columns. Scales are rounded to fp16,
    as the checkpoint stores them, so :func:`save_quantized` then :func:`load_quantized` gives the
    same model. q/k/v and gate/up are fused (one quantized matrix each; per-row codes make that the
    same as quantizing them one by one). Embeddings and norms stay float.

    The output head stays float by default: it decides every logit directly, with no later layer to
    average its error out, and AWQ/GPTQ checkpoints (and the readers of them) leave it unquantized.
    ``lm_head=True`` quantizes an untied head too (at the same bits), which saves
    the most bytes at small model sizes; such a checkpoint is read by lmstack only.

    Args:
        model: A float :class:`~lmstack.core.CausalLM` with real weights, prepared for inference or not.
        method: ``"rtn"`` (round to nearest) or ``"awq"`` (activation-aware scales and clipping,
            calibrated on ``texts`` with ``tokenizer``, then rounded to nearest; 4 bits).
        bits: 8 or 4.
        group_size: Input columns per group for 4 bits (must divide every in_features; 32, 64, 128
            or 256 use torch's packed CPU kernel).
        lm_head: Quantize an untied output head too.
        kernel_dtype: The activations' dtype inside torch's CPU int8/int4 kernels (default bfloat16,
            their only fast path in torch 2.13; None: the model's dtype, exact but 30-150x slower).
        tokenizer: For ``method="awq"``: the model's tokenizer.
        texts: For ``method="awq"``: calibration texts or a file (default: the bundled world).
        progress: Show a progress bar over layers (default: only on an interactive terminal).
        **awq_options: Passed to :func:`lmstack.infer.quant._awq.awq_quantize`.

    Returns:
        The model itself, in eval mode.

    Raises:
        InferError: Unknown method or bits, a group size that does not divide a layer, meta weights,
            a tied output head with ``lm_head=True``, or projections that are not ``nn.Linear``.
    """
    if bits not in (4, 8):
        raise InferError(
            f"weight-only quantization supports bits=8 (per-channel) or 4 (group-wise), got {bits}."
        )
    if method not in ("rtn", "awq"):
        raise InferError(f"unknown quantization method {method!r}; use 'rtn' or 'awq'.")
    embed = model.model.embed_tokens.weight
    if embed.device.type == "meta":
        raise InferError("quantize_model needs real weights; load the checkpoint first.")
    if lm_head and model.config.tie_word_embeddings:
        raise InferError("lm_head=True needs an untied output head; this model ties it to the embedding.")
    if method == "awq":
        if bits != 4:
            raise InferError("AWQ quantizes to 4 bits; use bits=4 (or method='rtn' for 8 bits).")
        if tokenizer is None:
            raise InferError("method='awq' needs tokenizer= (to encode the calibration texts).")
        from lmstack.infer.quant._awq import awq_quantize  # lazy: calibration pulls in more

        awq_quantize(
            model, tokenizer, texts, bits=bits, group_size=group_size, progress=progress, **awq_options
        )
    dtype = embed.dtype
    model.eval()

    def make(parts: list[Part], attr: str) -> WeightOnlyLinear:
        if bits == 8:
            return _int8_module(parts, attr, dtype, kernel_dtype)
        return _int4_module(parts, attr, dtype, group_size, kernel_dtype)

    replace_projections(model, make, progress=progress)
    if lm_head:
        parts = _parts_of(model, ("lm_head",), None)
        if parts is not None:
            model.lm_head = make(parts, "lm_head")  # type: ignore[assignment]
    logger.info(
        "quantized %s to %d bits (%s, group size %d)", model.config.model_type, bits, method, group_size
    )
    return model
