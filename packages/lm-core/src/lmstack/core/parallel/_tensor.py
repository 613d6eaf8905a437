"""Tensor (and sequence) parallelism for :class:`~lmstack.core.CausalLM` with DTensor ``parallelize_module``.

Each decoder layer is cut Megatron-style over the ``tp`` ranks of a 1-D device mesh:

* attention: q, k and v column-wise (each rank owns ``heads / tp`` query and key-value heads, and the
  attention backend sees only those), the output projection row-wise (one reduction of ``[B, T, C]``);
* feed-forward: gate and up column-wise, down row-wise;
* the embedding vocab-parallel (each rank owns a slice of the vocabulary's rows) and the output head
  column-wise over the vocabulary. With ``loss_parallel`` its logits stay sharded on the vocabulary,
  and :func:`tp_cross_entropy` computes the loss without ever gathering ``[tokens, V]``.

With ``sequence_parallel`` the residual stream between those blocks, and the RMSNorms on it, hold
``T / tp`` tokens of every row on each rank (sharded on dim 1): the row-wise reductions become
reduce-scatters, and each block all-gathers its normed input on the way in. That cuts the activation
memory outside attention and the feed-forward by ``tp`` at the same communication volume. The body's
final hidden states are gathered whole again, so :attr:`CausalLM.hidden_states`, ``logits_indices``
and every attention backend see the usual ``[B, T, C]`` (packed ``cu_seqlens`` stay global).

Everything rides DTensor; no collective is written here.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from lmstack.core._config import ModelConfig
from lmstack.core._errors import ConfigError
from lmstack.core.model._transformer import CausalLM, DecoderLayer

__all__ = ["apply_tensor_parallel", "check_sequence_length", "check_tensor_parallel", "tp_cross_entropy"]

logger = logging.getLogger(__name__)

Reduction = Literal["mean", "sum", "none"]


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Check that ``config`` can be cut over ``tp`` tensor-parallel ranks.

    Query heads, key-value heads and the feed-forward width must split evenly (each rank computes
    whole heads). The vocabulary need not: the embedding and the output head shard it unevenly.

    Args:
        config: The model's architecture.
        tp: The tensor-parallel degree.

    Raises:
        ConfigError: ``tp`` is not a positive integer, or a width is not divisible by it; the message
            names the field and the degrees that would work, and leaves how to choose one to the
            caller (training's ``parallel.tp``, serving's ``tensor_parallel_size``).
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"the tensor-parallel degree must be a positive integer, got {tp!r}.")
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, field)
        if value % tp:
            fits = [d for d in range(1, min(value, 64) + 1) if _divides_all(config, d)]
            raise ConfigError(
                f"tensor parallelism over tp={tp} ranks splits {field} evenly, but {field}={value} is "
                f"not divisible by {tp}; the tensor-parallel degree must divide num_attention_heads="
                f"{config.num_attention_heads}, num_key_value_heads={config.num_key_value_heads} and "
                f"intermediate_size={config.intermediate_size} (here: {', '.join(map(str, fits))}).",
                field=field,
            )


def _divides_all(config: ModelConfig, d: int) -> bool:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    assert kv is not None
    return heads % d == 0 and kv % d == 0 and config.intermediate_size % d == 0


_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def _layer_plan(model: CausalLM, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of one decoder layer, relative to it; linear styles come from the model's tp_plan."""
    plan: dict[str, ParallelStyle] = {}
    prefix = "model.layers.*."
    # The decoder layers are the same in every family (and in a reward model's body): CausalLM's plan.
    for pattern, style in CausalLM.tp_plan(model).items():
        if not pattern.startswith(prefix):
            continue  # the embedding and the head are planned in apply_tensor_parallel
        name = pattern.removeprefix(prefix)
        if style == "rowwise" and sequence_parallel:
            # The reduction becomes a reduce-scatter onto the sequence-sharded residual stream.
            plan[name] = RowwiseParallel(output_layouts=Shard(1))
        else:
            plan[name] = _STYLES[style]()
    if sequence_parallel:
        seq, whole = Shard(1), Replicate()
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
        # Attention and the feed-forward need every token of a row: all-gather the normed input
        # (once, shared by q, k and v; its backward is one reduce-scatter). cos, sin and the
        # backend pass through untouched.
        plan["self_attn"] = PrepareModuleInput(
            input_layouts=(seq, None, None, None), desired_input_layouts=(whole, None, None, None)
        )
        plan["mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,))
    return plan


def apply_tensor_parallel(
    model: CausalLM,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
) -> CausalLM:
    """Shard ``model`` over the ranks of ``tp_mesh`` (in place) with DTensor's ``parallelize_module``.

    Apply it before :func:`apply_fsdp` (2-D FSDP + TP) and before building the optimizer. Every rank
    must hold the same weights when it is called (the same seed, or the same checkpoint): linear and
    embedding weights are scattered from the mesh's first rank, norm weights are kept as they are.

    What changes for the caller:

    * The logits: with ``loss_parallel`` a :class:`~torch.distributed.tensor.DTensor` sharded on
      the vocabulary (``Shard(-1)``); compute the loss with :func:`tp_cross_entropy`, which never
      gathers them. Without it, a plain tensor of the whole vocabulary on every rank.
    * Every rank computes the same loss from the same batch: a tensor-parallel group reads one batch.
    * ``head=`` (a fused head-and-loss callable) is refused: it would multiply by the sharded head
      weight as if it were whole. Use plain logits and :func:`tp_cross_entropy`.
    * With ``sequence_parallel`` the tokens of a row (``input_ids.shape[1]``) must be divisible by
      the tp degree (checked at forward time). The last layer no longer runs on the
      ``logits_indices`` rows alone (it runs on every token and the rows are picked after), since
      its input is a slice of each row.
    * A tied embedding stays one parameter: the embedding and the head shard the same ``[V, C]``
      matrix on the vocabulary the same way, so both use the one DTensor.

    Args:
        model: A training-layout model (not :meth:`~CausalLM.prepare_for_inference`'d), on the
            mesh's device type. A module with the same body (``model``, ``config``) and no ``lm_head``
            (a reward model with its own scalar head) is sharded in its body only; its head stays
            whole on every rank, reading the body's rows whole. LoRA layers (peft's layout) on the
            decoder projections are split with them; parameters that do not require gradients (a
            frozen base) still do not afterwards.
        tp_mesh: A 1-D device mesh, e.g. ``parallel_mesh["tp"]``.
        sequence_parallel: Shard the residual stream and the norms on the sequence dim.
        loss_parallel: Keep the logits sharded on the vocabulary (see above).

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: The mesh is not 1-D, the model was already sharded or prepared for inference,
            a projection is neither a plain ``nn.Linear`` nor peft's LoRA layer over one (LoRA on the
            output head, a quantized linear), or a width is not
            divisible by the tp degree (see :func:`check_tensor_parallel`).
    """
    if tp_mesh.ndim != 1:
        raise ConfigError(
            f"apply_tensor_parallel takes a 1-D device mesh (e.g. parallel_mesh['tp']), got one with "
            f"{tp_mesh.ndim} dims {tp_mesh.mesh_dim_names}."
        )
    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp)
    if getattr(model, "_tensor_parallel", None) is not None:
        raise ConfigError("this model is already tensor-parallel; apply_tensor_parallel once per model.")
    if getattr(model, "inference_layout", None) is not None:
        raise ConfigError(
            "apply_tensor_parallel needs the training layout, but the model was prepared for inference; "
            "shard it before prepare_for_inference (or not at all for serving)."
        )
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _PROJECTIONS and type(module) is not nn.Linear and not _is_lora(module, leaf):
            raise ConfigError(
                f"apply_tensor_parallel shards plain nn.Linear projections (or LoRA adapters on a decoder "
                f"layer's projections), but {name} is {type(module).__name__}; merge adapters (or "
                "dequantize) first."
            )
        if leaf == "embed_tokens" and type(module) is not nn.Embedding:
            raise ConfigError(
                f"apply_tensor_parallel needs an nn.Embedding at {name}, got {type(module).__name__}."
            )

    # parallelize_module makes new Parameters, trainable whatever the old ones were: a frozen base (LoRA)
    # must stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    # A model without an output head (a reward model's body with its own small scalar head) gets the
    # body's plan only; its head stays whole on every rank, reading the body's gathered rows.
    lm_head: nn.Module | None = getattr(model, "lm_head", None)
    tied = lm_head is not None and lm_head.weight is model.model.embed_tokens.weight
    seq = Shard(1)
    body: dict[str, ParallelStyle] = {
        # Vocab-parallel lookup: each rank embeds the ids in its slice, zeros elsewhere, and the
        # partial sums are reduced (scattered over the sequence with sequence parallelism).
        "embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq if sequence_parallel else Replicate()
        ),
    }
    if sequence_parallel:
        body["norm"] = SequenceParallel()
    parallelize_module(model.model, tp_mesh, body)
    plan = _layer_plan(model, sequence_parallel)
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        parallelize_module(layer, tp_mesh, _with_adapters(layer, plan, sequence_parallel))
    if sequence_parallel:
        # The body hands out whole rows again, which logits_indices, hidden_states and the head need.
        parallelize_module(
            model.model,
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=seq, desired_output_layouts=Replicate(), use_local_output=True
            ),
        )
    head_style = (
        ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        if loss_parallel
        else ColwiseParallel(output_layouts=Replicate())
    )
    if lm_head is not None:
        parallelize_module(lm_head, tp_mesh, head_style)
    if tied:
        # parallelize_module replaced each module's parameter with its own DTensor; both are the
        # same [V, C] matrix sharded on dim 0, so one of them serves both again.
        model.lm_head.weight = model.model.embed_tokens.weight

    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    model._tensor_parallel = "sequence" if sequence_parallel else "tensor"
    if sequence_parallel:
        model.model.register_forward_pre_hook(_SequenceCheck(tp))
    if lm_head is not None:
        model.register_forward_pre_hook(_refuse_head, with_kwargs=True)
    logger.info(
        "tensor-parallel over %d ranks (sequence parallel %s, loss parallel %s%s)",
        tp,
        "on" if sequence_parallel else "off",
        "on" if loss_parallel else "off",
        ", tied embedding shared" if tied else "",
    )
    return model


def _is_lora(module: nn.Module, leaf: str) -> bool:
    """Whether ``module`` is a LoRA layer over a plain linear on a decoder projection (not the head).

    peft's layout: a ``base_layer`` linear and ``lora_A``/``lora_B`` dicts of linears, by adapter name.
    """
    base, lora_a, lora_b = (getattr(module, n, None) for n in ("base_layer", "lora_A", "lora_B"))
    if leaf == "lm_head" or type(base) is not nn.Linear:
        return False
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return False
    return all(type(m) is nn.Linear for m in (*lora_a.values(), *lora_b.values()))


def _with_adapters(
    layer: nn.Module, plan: dict[str, ParallelStyle], sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    """``plan`` for one decoder layer, with each LoRA-wrapped projection's base and adapters planned.

    The base linear takes the projection's style. A column-wise projection's ``B`` is split on its
    outputs as the base is, and its ``A`` stays whole (its input is the whole row; its gradient comes
    back whole through ``B``'s input, which the tensor-parallel backward all-reduces). A row-wise
    projection's ``A`` is split on its inputs (the local heads or feed-forward slice) and reduced
    as the base is; its ``B`` stays whole, and under sequence parallelism reads sequence shards, so
    its weight is a replicated DTensor whose gradient is summed over the ranks.
    """
    out: dict[str, ParallelStyle] = {}
    for name, style in plan.items():
        module = layer.get_submodule(name) if name.rsplit(".", 1)[-1] in _PROJECTIONS else None
        if module is None or not _is_lora(module, name.rsplit(".", 1)[-1]):
            out[name] = style
            continue
        out[f"{name}.base_layer"] = style
        for adapter in module.lora_A:  # type: ignore[union-attr]
            if isinstance(style, ColwiseParallel):
                # A reads the row as the base does, but as a plain tensor (under sequence parallelism
                # the layer's input arrives as a replicated DTensor).
                whole = (Replicate(),)
                out[f"{name}.lora_A.{adapter}"] = PrepareModuleInput(
                    input_layouts=whole, desired_input_layouts=whole, use_local_output=True
                )
                out[f"{name}.lora_B.{adapter}"] = ColwiseParallel()
            else:
                reduced = Shard(1) if sequence_parallel else Replicate()
                out[f"{name}.lora_A.{adapter}"] = RowwiseParallel(output_layouts=reduced)
                if sequence_parallel:
                    out[f"{name}.lora_B.{adapter}"] = SequenceParallel(use_local_output=True)
    return out


# The modules apply_tensor_parallel shards (by attribute name), which must be plain nn.Linear.
_PROJECTIONS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
)


class _SequenceCheck:
    """Forward pre-hook of the body: sequence parallelism needs rows of a length tp divides."""

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):  # input_ids, as CausalLM.forward passes them
            check_sequence_length(args[0].shape, self.tp)


def check_sequence_length(shape: torch.Size | tuple[int, ...], tp: int) -> None:
    """Raise :class:`ConfigError` unless rows of ``shape`` (``[B, T]`` token ids) split over ``tp`` ranks."""
    if len(shape) != 2:
        raise ConfigError(f"input_ids must be [batch, tokens], got shape {tuple(shape)}.")
    if shape[1] % tp:
        raise ConfigError(
            f"sequence parallelism splits each row's tokens over tp={tp} ranks, but input_ids is "
            f"{list(shape)} and {shape[1]} tokens per row is not divisible by {tp}; pack or pad rows "
            f"to a multiple of {tp} tokens, or apply tensor parallelism with sequence_parallel=False."
        )


def _refuse_head(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if kwargs.get("head") is not None:
        raise ConfigError(
            "a tensor-parallel model cannot take head= (a fused head and loss multiplies by the output "
            "head's weight, which is sharded over the vocabulary here); call it without head= and "
            "compute the loss with lmstack.core.parallel.tp_cross_entropy(logits, targets)."
        )


class _LossParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of vocab-sharded logits under torch's ``loss_parallel``, forward and backward.

    ``loss_parallel`` must also be active when the loss's backward runs. The train loop calls
    ``backward()`` far from here, so the loss graph is built on a detached copy of the logits and
    differentiated inside the context in this function's own backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: DTensor, targets: Tensor, reduction: Reduction, ignore_index: int
    ) -> Tensor:
        with torch.enable_grad(), loss_parallel():
            leaf = logits.detach().requires_grad_(logits.requires_grad)
            flat = leaf.reshape(-1, leaf.shape[-1]).float()
            loss = F.cross_entropy(flat, targets.reshape(-1), reduction=reduction, ignore_index=ignore_index)
        assert isinstance(loss, DTensor)
        ctx.leaf, ctx.loss = leaf, loss
        out = loss.full_tensor() if any(not p.is_replicate() for p in loss.placements) else loss.to_local()
        return out.detach().reshape(targets.shape if reduction == "none" else ())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        loss: DTensor = ctx.loss
        upstream = DTensor.from_local(
            grad.reshape(loss.shape).contiguous(), loss.device_mesh, loss.placements, run_check=False
        )
        with loss_parallel():
            (g,) = torch.autograd.grad(loss, ctx.leaf, upstream)
        ctx.leaf = ctx.loss = None
        return g, None, None, None


def tp_cross_entropy(
    logits: Tensor, targets: Tensor, *, reduction: Reduction = "mean", ignore_index: int = -100
) -> Tensor:
    """Token cross-entropy (in float32) of logits that may be sharded over the vocabulary.

    One call for both kinds of logits a model gives: a vocab-sharded
    :class:`~torch.distributed.tensor.DTensor` (``apply_tensor_parallel(..., loss_parallel=True)``),
    computed with torch's ``loss_parallel`` without gathering the vocabulary, or a plain tensor
    (``F.cross_entropy``). The backward needs no context of its own.

    Args:
        logits: ``[..., V]`` logits.
        targets: ``[...]`` target ids (a plain tensor, the same on every tensor-parallel rank).
        reduction: ``mean`` over the non-ignored targets, ``sum``, or ``none`` (shape ``[...]``).
        ignore_index: Targets with this value add no loss.

    Returns:
        A plain tensor, the same on every tensor-parallel rank.
    """
    if logits.shape[:-1] != targets.shape:
        raise ConfigError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: logits must be "
            f"the targets' shape plus the vocabulary dim."
        )
    if isinstance(logits, DTensor):
        out = _LossParallelCrossEntropy.apply(logits, targets, reduction, ignore_index)
        assert isinstance(out, Tensor)
        return out
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, targets.reshape(-1), reduction=reduction, ignore_index=ignore_index)
    return loss.reshape(targets.shape) if reduction == "none" else loss
