"""Quantized checkpoints: writing AutoAWQ GEMM (4-bit) and GPTQ (8-bit), reading AWQ and GPTQ.

The formats, as transformers, vLLM, AutoAWQ and GPTQModel read them:

* **AWQ GEMM** (``quant_method: awq``, ``version: gemm``, ``bits: 4``, ``zero_point: true``): per
  projection ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/group, out/8]`` (eight 4-bit
  values per int32 in AutoAWQ's interleaved order, see :mod:`._packing`), ``scales`` fp16
  ``[in/group, out]``; ``W[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o]``.
* **GPTQ** (``quant_method: gptq``, bits 4 or 8): ``qweight`` int32 ``[in * bits / 32, out]``
  packed along the input (value ``r`` of each run of ``32/bits`` rows in bits ``bits*r``),
  ``qzeros`` int32 ``[groups, out * bits / 32]`` packed the same way along the output, ``scales``
  fp16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` (each input row's group). The original
  ``checkpoint_format: gptq`` (v1, also when absent) stores every zero point minus one;
  ``gptq_v2`` stores it as is. ``desc_act: true`` (act-order) checkpoints have a permuted
  ``g_idx``; they are read by gathering the input columns into group order at run time.

lmstack writes 4-bit models as AWQ GEMM and 8-bit (symmetric, per-channel) models as GPTQ with
``bits: 8, group_size: -1, sym: true, desc_act: false`` — the standard 8-bit weight-only layout
that vLLM and transformers (through GPTQModel) read. A quantized output head (``quantize_model(...,
lm_head=True)``) is marked ``"lm_head": true`` as GPTQModel does; only lmstack reads it back.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmstack.core import CausalLM, load_config, save_pretrained
from lmstack.core.checkpoint import checkpoint_files
from lmstack.infer._errors import InferError
from lmstack.infer.quant._linear import WeightOnlyLinear, unpack_rows
from lmstack.infer.quant._packing import GroupQuant, unpack_awq
from lmstack.infer.quant._rtn import FUSED_GROUPS

__all__ = ["QuantSpec", "is_quantized_checkpoint", "load_quantized", "quantization_spec", "save_quantized"]

logger = logging.getLogger(__name__)

_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_IGNORED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class QuantSpec:
    """A checkpoint's weight quantization, as read from its ``quantization_config``.

    Attributes:
        method: ``"awq"`` or ``"gptq"``.
        bits: 4 or 8.
        group_size: Input columns per group (-1: one group per row, i.e. per-channel).
        zeros_minus_one: GPTQ v1: stored zero points are one less than the real ones.
        lm_head: The output head is quantized too.
    """

    method: str
    bits: int
    group_size: int
    zeros_minus_one: bool = False
    lm_head: bool = False


def _read_quant_config(root: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None and (root / "quantize_config.json").is_file():  # AutoGPTQ's older side file
        try:
            qc = json.loads((root / "quantize_config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InferError(f"{root / 'quantize_config.json'} is not valid JSON ({exc}).") from exc
        if isinstance(qc, dict):
            qc = {"quant_method": "gptq", **qc}
    return qc if isinstance(qc, dict) else None


def is_quantized_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint directory declares a ``quantization_config`` (or a GPTQ side file)."""
    root = Path(path)
    return root.is_dir() and _read_quant_config(root) is not None


def quantization_spec(path: str | os.PathLike[str]) -> QuantSpec:
    """Read and check a checkpoint's ``quantization_config``.

    Raises:
        InferError: There is none, or it describes a format or option lmstack cannot load.
    """
    root = Path(path)
    qc = _read_quant_config(root)
    if qc is None:
        raise InferError(f"{root} has no quantization_config in config.json; load it with load_pretrained.")
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size", -1))
    lm_head = bool(qc.get("lm_head", False))
    supported = "AWQ (version gemm, 4-bit, zero_point) or GPTQ (4-bit, or 8-bit symmetric per-channel)"
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4 or not qc.get("zero_point", True):
            raise InferError(
                f"{root}: AWQ checkpoint with version={version!r}, bits={bits}, zero_point="
                f"{qc.get('zero_point', True)}; lmstack loads {supported}. Re-quantize with "
                "`lmstack quantize awq`."
            )
        return QuantSpec("awq", 4, int(group_size), lm_head=lm_head)
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise InferError(
                f"{root}: GPTQ checkpoint_format {fmt!r} is not supported; lmstack loads {supported}."
            )
        if bits not in (4, 8):
            raise InferError(f"{root}: GPTQ with bits={bits}; lmstack loads {supported}.")
        if bits == 8 and (int(group_size) != -1 or not qc.get("sym", True)):
            raise InferError(
                f"{root}: 8-bit GPTQ with group_size={group_size}, sym={qc.get('sym', True)}; lmstack's int8 "
                "kernel is per-channel and symmetric (group_size -1, sym true). Re-quantize with "
                "`lmstack quantize rtn --bits 8`."
            )
        return QuantSpec("gptq", int(bits), int(group_size), zeros_minus_one=fmt == "gptq", lm_head=lm_head)
    raise InferError(
        f"{root}: quantization_config has quant_method={qc.get('quant_method')!r}; lmstack loads {supported}."
    )


# -- writing ------------------------------------------------------------------------------------------
def _model_spec(model: CausalLM) -> tuple[int, int, bool]:
    mods = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    if not mods:
        raise InferError("the model has no quantized layers; call quantize_model(model, ...) first.")
    schemes = {(m.bits, m.group_size if m.bits == 4 else -1) for m in mods}
    if len(schemes) != 1:
        raise InferError(f"the model mixes quantization schemes {sorted(schemes)}; a checkpoint holds one.")
    bits, group = schemes.pop()
    return bits, group, isinstance(model.lm_head, WeightOnlyLinear)


def save_quantized(
    model: CausalLM,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    max_shard_size: int | str = "5GB",
    progress: bool | None = None,
) -> Path:
    """Write a model quantized by :func:`quantize_model` as a Hugging Face quantized checkpoint.

    4-bit models are written in the AutoAWQ GEMM layout with ``quantization_config = {"quant_method":
    "awq", "bits": 4, "group_size": ..., "zero_point": true, "version": "gemm",
    "modules_to_not_convert": null}``; 8-bit ones in the GPTQ layout with ``{"quant_method": "gptq",
    "bits": 8, "group_size": -1, "sym": true, "desc_act": false, "checkpoint_format": "gptq"}``.
    Float tensors (embeddings, norms, an unquantized head) keep the model's dtype. The directory is
    replaced atomically, as :func:`~lmstack.core.save_pretrained` does.

    Args:
        model: The quantized model.
        out_dir: Target directory.
        tokenizer: Optionally, a tokenizer to save alongside.
        max_shard_size: Largest safetensors shard.
        progress: Show a progress bar (default: only on an interactive terminal).

    Returns:
        The checkpoint directory.

    Raises:
        InferError: The model has no quantized layers or mixes schemes.
    """
    bits, group, lm_head = _model_spec(model)
    if bits == 4:
        qc: dict[str, Any] = {
            "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None,
        }  # fmt: skip
    else:
        qc = {
            "quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True, "desc_act": False,
            "checkpoint_format": "gptq", "true_sequential": True,
        }  # fmt: skip
    if lm_head:
        qc["lm_head"] = True
    config = model.config
    extra = {**config.extra, "quantization_config": qc}
    # save_pretrained writes model.config; lend it the config with the quantization section.
    model.config = config.replace(extra=extra)
    try:
        return save_pretrained(
            model, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, progress=progress
        )
    finally:
        model.config = config


# -- reading ------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: torch.dtype | str | None, declared: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype not in (None, "auto") else declared or "float16"
    resolved = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InferError(f"dtype {name!r} is not a floating-point torch dtype (try 'float32' or 'bfloat16').")
    return resolved


def _codes(
    spec: QuantSpec, name: str, t: dict[str, Tensor], in_f: int, out_f: int
) -> tuple[Any, Tensor | None]:
    """One projection's codes: ``("int8", q, scales)`` or ``("int4", GroupQuant)``, and its input order."""
    try:
        if spec.method == "awq":
            quant = unpack_awq(t["qweight"], t["qzeros"], t["scales"])
            if quant.q.shape != (out_f, in_f):
                raise InferError(
                    f"{name}: AWQ tensors unpack to {tuple(quant.q.shape)}, expected {(out_f, in_f)}."
                )
            return ("int4", quant), None
        codes = unpack_rows(t["qweight"], spec.bits)  # [in, out]
        zeros = unpack_rows(t["qzeros"].t().contiguous(), spec.bits).t()  # [groups, out]
    except KeyError as exc:
        raise InferError(f"{name}: quantized tensor {exc} missing from the checkpoint.") from exc
    if codes.shape != (in_f, out_f):
        raise InferError(f"{name}: GPTQ qweight unpacks to {tuple(codes.shape)}, expected {(in_f, out_f)}.")
    if spec.zeros_minus_one:
        zeros = zeros + 1
    scales = t["scales"].to(torch.float32)  # [groups, out]
    if spec.bits == 8:
        if scales.shape[0] != 1 or not bool((zeros == 128).all()):
            raise InferError(
                f"{name}: 8-bit GPTQ weights must be symmetric per-channel (one group, zero 128)."
            )
        return ("int8", (codes - 128).t().to(torch.int8).contiguous(), scales[0]), None
    groups = scales.shape[0]
    if in_f % groups:
        raise InferError(f"{name}: {groups} groups do not divide {in_f} input columns.")
    size = in_f // groups
    g_idx = t.get("g_idx")
    natural = torch.arange(in_f) // size
    perm = None
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), natural):
        # act-order: sort the input columns by group; each group must then be a run of `size` columns.
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        if not torch.equal(g_idx.to(torch.int64)[perm], natural):
            raise InferError(f"{name}: g_idx does not assign {size} input columns to each group.")
        codes = codes[perm]
    if int(zeros.max()) > 16 or int(zeros.min()) < 0:
        raise InferError(f"{name}: GPTQ zero points outside 0..16.")
    quant = GroupQuant(
        codes.t().to(torch.uint8).contiguous(),
        scales.t().contiguous(),
        zeros.t().to(torch.uint8).contiguous(),
        4, size,
    )  # fmt: skip
    return ("int4", quant), perm


def _build(
    parts: list[tuple[str, Any, Tensor | None, Tensor | None]],
    attr: str,
    dtype: torch.dtype,
    device: torch.device,
    kernel_dtype: torch.dtype | None,
) -> WeightOnlyLinear:
    """One module from ``(name, codes, perm, bias)`` parts that share a scheme, stacked by rows."""
    names = [p[0] for p in parts]
    kind = parts[0][1][0]
    sizes = [(p[1][1].shape[0] if kind == "int8" else p[1][1].q.shape[0]) for p in parts]
    biases = [p[3] for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b if b is not None else torch.zeros(s) for b, s in zip(biases, sizes, strict=True)]
        ).to(device)
    if kind == "int8":
        q = torch.cat([p[1][1] for p in parts]).to(device)
        scales = torch.cat([p[1][2] for p in parts]).to(device)
        return WeightOnlyLinear.from_int8(
            q, scales, names=names, sizes=sizes, attr=attr, dtype=dtype, bias=bias, kernel_dtype=kernel_dtype
        )
    qs = [p[1][1] for p in parts]
    quant = GroupQuant(
        torch.cat([g.q for g in qs]).to(device), torch.cat([g.scales for g in qs]).to(device),
        torch.cat([g.zeros for g in qs]).to(device), 4, qs[0].group_size,
    )  # fmt: skip
    perm = parts[0][2]
    return WeightOnlyLinear.from_groups(
        quant, names=names, sizes=sizes, attr=attr, dtype=dtype, bias=bias,
        perm=None if perm is None else perm.to(device), kernel_dtype=kernel_dtype,
    )  # fmt: skip


def _fusable(parts: list[tuple[str, Any, Tensor | None, Tensor | None]]) -> bool:
    first = parts[0]
    for p in parts[1:]:
        if p[1][0] != first[1][0]:
            return False
        if first[1][0] == "int4" and p[1][1].group_size != first[1][1].group_size:
            return False
        a, b = p[2], first[2]
        if (a is None) != (b is None) or (a is not None and b is not None and not torch.equal(a, b)):
            return False
    return True


def load_quantized(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    kernel_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool | None = None,
) -> CausalLM:
    """Load an AWQ (GEMM) or GPTQ checkpoint, lmstack's or another tool's, as a quantized model.

    Quantized projections become :class:`~lmstack.infer.quant.WeightOnlyLinear` modules (q/k/v and
    gate/up fused when they share a scheme); everything else loads as float in ``dtype``. The model
    is returned unprepared: the engine's :meth:`~lmstack.core.CausalLM.prepare_for_inference` lays out
    the float head and leaves the quantized layers as they are.

    Args:
        path: The checkpoint directory (config.json with ``quantization_config``, safetensors).
        dtype: Activation and float-weight dtype (default: the checkpoint's declared dtype, else fp16).
        device: Where the model goes.
        kernel_dtype: The activations' dtype inside torch's CPU int8/int4 kernels (default bfloat16,
            their fast path; None: ``dtype``, exact but much slower; see :mod:`._linear`).
        progress: Show a progress bar (default: only on an interactive terminal).

    Returns:
        The model in eval mode.

    Raises:
        InferError: An unsupported ``quantization_config``, tensors that do not fit the config, or
            missing tensors.
    """
    root = Path(path)
    spec = quantization_spec(root)
    config = load_config(root)
    if config.model_type == "internlm2":
        raise InferError(
            f"{root}: quantized InternLM2 checkpoints (packed wqkv) are not supported; use the llama layout."
        )
    target = _resolve_dtype(dtype, config.dtype)
    device = torch.device(device)
    model = CausalLM(config, device="meta", dtype=target)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    quant: dict[str, dict[str, Tensor]] = {}
    floats: dict[str, Tensor] = {}
    files = checkpoint_files(root)
    for file in tqdm(
        files, desc=f"Loading {root.name}", unit="shard", disable=None if progress is None else not progress
    ):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    if key.endswith(_IGNORED):
                        continue
                    module, _, leaf = key.rpartition(".")
                    if leaf in _QUANT_SUFFIXES:
                        quant.setdefault(module, {})[leaf] = f.get_tensor(key)
                    else:
                        floats[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise InferError(f"cannot read {file}: {exc}; re-download or re-save it.") from exc
    # A projection's bias sits beside its quantized tensors.
    for module, tensors in quant.items():
        bias = floats.pop(f"{module}.bias", None)
        if bias is not None:
            tensors["bias"] = bias

    def codes_of(
        prefix: str, name: str, lin: nn.Linear
    ) -> tuple[str, Any, Tensor | None, Tensor | None] | None:
        t = quant.pop(f"{prefix}.{name}", None)
        if t is None:
            return None
        codes, perm = _codes(spec, f"{prefix}.{name}", t, lin.in_features, lin.out_features)
        return name, codes, perm, t.get("bias")

    for i, layer in enumerate(model.model.layers):
        for sub, fused, names, out in FUSED_GROUPS:
            parent = getattr(layer, sub)
            prefix = f"model.layers.{i}.{sub}"
            parts = [codes_of(prefix, n, getattr(parent, n)) for n in names]
            got = [p for p in parts if p is not None]
            if got and len(got) == len(parts) and _fusable(got):
                for n in names:
                    delattr(parent, n)
                setattr(parent, fused, _build(got, fused, target, device, kernel_dtype))
            else:
                for p in got:
                    delattr(parent, p[0])
                    setattr(parent, p[0], _build([p], p[0], target, device, kernel_dtype))
            o = codes_of(prefix, out, getattr(parent, out))
            if o is not None:
                delattr(parent, out)
                setattr(parent, out, _build([o], out, target, device, kernel_dtype))
    if "lm_head" in quant:
        if config.tie_word_embeddings:
            raise InferError(f"{root}: a quantized lm_head with tied embeddings is not supported.")
        t = quant.pop("lm_head")
        codes, perm = _codes(spec, "lm_head", t, model.lm_head.in_features, model.lm_head.out_features)
        head = ("lm_head", codes, perm, t.get("bias"))
        model.lm_head = _build([head], "lm_head", target, device, kernel_dtype)  # type: ignore[assignment]
    if quant:
        raise InferError(
            f"{root}: quantized tensors for modules this {config.model_type} model does not have: "
            f"{sorted(quant)[:5]}."
        )
    params = dict(model.named_parameters())
    unexpected = []
    for key, tensor in floats.items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key not in params:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[key]:
            raise InferError(
                f"{root}: tensor {key!r} has shape {list(tensor.shape)}, the config implies "
                f"{list(expected[key])}."
            )
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=target), requires_grad=False))
    if unexpected:
        raise InferError(f"{root}: tensors this model does not use: {unexpected[:8]}.")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InferError(f"{root}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}.")
    logger.info("loaded %s (%s %d-bit, %s)", root, spec.method, spec.bits, target)
    return model.eval()
