"""Activation memory per token, with and without activation checkpointing, measured on a real batch.

What is measured: the bytes autograd keeps for the backward pass of one micro-batch's forward (the
decoder, the output head at the loss positions and the cross-entropy, fused or not as the run
computes it), counted by
``torch.autograd.graph.saved_tensors_hooks`` with every storage counted once and the parameters left
out. With checkpointing, the tensors saved inside a checkpointed layer are not kept (the layer is
recomputed in backward), but each layer's inputs are: those are counted by a pre-hook on the layers.
Divided by the micro-batch's real tokens this is a device-independent figure (the same on CPU and
GPU), which scales linearly with the micro-batch; transient buffers of the backward pass itself and
the allocator's fragmentation come on top.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core import CausalLM
from lmstack.train._fused_loss import FusedLinearCrossEntropy
from lmstack.train._objectives import loss_targets

__all__ = ["ActivationMemory", "measure_activation_memory"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes saved for backward per real token of a micro-batch.

    Attributes:
        per_token: Without activation checkpointing.
        per_token_checkpointed: With it.
        tokens: Real tokens of the measured micro-batch.
    """

    per_token: float
    per_token_checkpointed: float
    tokens: int


class _SavedBytes:
    """Counts the storages autograd saves (each once, parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.seen = set(exclude)
        self.bytes = 0

    def add(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()

    def pack(self, tensor: Tensor) -> Tensor:
        self.add(tensor)
        return tensor


def _forward_bytes(model: CausalLM, batch: Any, checkpointing: bool, autocast: bool, fused: bool) -> int:
    device = batch.input_ids.device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = _SavedBytes(params)
    before = model.model.activation_checkpointing
    model.enable_activation_checkpointing(checkpointing)
    with ExitStack() as stack:
        if checkpointing:  # a checkpointed layer keeps its inputs for the recomputation

            def inputs(_module: Any, args: tuple[Any, ...]) -> None:
                for arg in args:
                    if isinstance(arg, Tensor):
                        counter.add(arg)

            for layer in model.model.layers:
                stack.callback(layer.register_forward_pre_hook(inputs).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t))
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast))
        indices, targets = loss_targets(batch.labels)
        attn = batch.attention()
        if fused:
            head = FusedLinearCrossEntropy(targets)
            loss = model(batch.input_ids, batch.position_ids, attn, logits_indices=indices, head=head)
        else:
            logits = model(batch.input_ids, batch.position_ids, attn, logits_indices=indices)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            del logits
    model.enable_activation_checkpointing(before)
    del loss  # the graph and what it saved go with it
    return counter.bytes


def measure_activation_memory(
    model: CausalLM, batch: Any, *, autocast: bool = False, fused_loss: bool = False
) -> ActivationMemory:
    """Bytes saved for backward per real token, with and without checkpointing, on ``batch``.

    Two forwards of the plain (unwrapped, uncompiled) model; nothing is backpropagated and the
    model's checkpointing setting is left as it was.

    Args:
        model: The model, on the batch's device, in train mode.
        batch: A micro-batch with ``input_ids``, ``position_ids``, ``labels``, ``attention()`` and
            ``num_tokens`` (packed or padded, language-modelling or preference).
        autocast: Run under bfloat16 autocast, as a ``precision: bfloat16`` run does.
        fused_loss: Compute the loss as ``run.fused_loss`` does (the output head and the cross-entropy
            in chunks: what it keeps for backward are the gradients it computed in the forward, not
            the logits).
    """
    plain = _forward_bytes(model, batch, checkpointing=False, autocast=autocast, fused=fused_loss)
    checkpointed = _forward_bytes(model, batch, checkpointing=True, autocast=autocast, fused=fused_loss)
    tokens = max(int(batch.num_tokens), 1)
    return ActivationMemory(plain / tokens, checkpointed / tokens, int(batch.num_tokens))
