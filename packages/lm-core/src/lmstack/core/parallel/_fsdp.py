"""FSDP2 (``fully_shard``) over the data-parallel dims of the mesh, alone or on a tensor-parallel model.

Each decoder layer is one FSDP unit (its parameters all-gathered just before its forward and
backward, freed after), and the root unit holds what is left: the embedding, the final norm and the
output head (a tied head shares the embedding's one shard). Gradients are reduce-scattered with an
average over the data-parallel ranks.

The mesh decides the flavour: 1-D (``dp_shard``, or ``dp_shard_sp`` when sequence-parallel ranks
share parameters) shards over every rank of it; 2-D (``dp_replicate``, ``dp_shard_sp``) is HSDP,
sharded within a replica group and all-reduced across groups. On a model that
:func:`~lmstack.core.parallel.apply_tensor_parallel` has cut, each parameter is already a DTensor on
the ``tp`` mesh and FSDP2 shards its local piece again over the data-parallel ranks (2-D FSDP + TP).
"""

from __future__ import annotations

import logging
from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lmstack.core._errors import ConfigError
from lmstack.core.model._transformer import CausalLM

__all__ = ["apply_fsdp"]

logger = logging.getLogger(__name__)


def apply_fsdp(
    model: CausalLM,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> CausalLM:
    """Shard ``model``'s parameters, gradients and optimizer state over ``dp_mesh`` with FSDP2, in place.

    Apply it after :func:`~lmstack.core.parallel.apply_tensor_parallel` (if any) and before building
    the optimizer: the model's class becomes an FSDP subclass and its parameters DTensors. Each rank
    of ``dp_mesh`` must be given its own batch; gradients are the average over them, so scale each
    rank's loss accordingly (e.g. by ``dp_size / global loss tokens`` for a summed token loss).

    Args:
        model: The model, on the mesh's device type.
        dp_mesh: 1-D (FSDP) or 2-D (HSDP: replicate dim first, shard dim second), e.g.
            ``parallel_mesh["dp_shard_sp"]`` or ``parallel_mesh.mesh["dp_replicate", "dp_shard_sp"]``.
        reshard_after_forward: Free each layer's gathered parameters after its forward (and gather
            them again for backward): less memory, one more all-gather per layer. The root unit keeps
            its own, since backward starts with them.
        mp_policy: FSDP2 mixed precision (e.g. bf16 parameters for compute, fp32 gradient reduction);
            None computes in the parameters' dtype.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: The mesh has neither 1 nor 2 dims, or the model is already FSDP-sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    if dp_mesh.ndim not in (1, 2):
        raise ConfigError(
            f"apply_fsdp takes a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP), got one with "
            f"{dp_mesh.ndim} dims {dp_mesh.mesh_dim_names}."
        )
    if isinstance(model, FSDPModule):
        raise ConfigError("this model is already FSDP-sharded; apply_fsdp once per model.")
    kwargs: dict[str, Any] = {"mesh": dp_mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    # One unit per decoder layer bounds the gathered memory to about one layer at a time.
    for layer in model.model.layers:
        # A pipeline stage keeps parameter-less placeholders for the layers other ranks hold.
        if next(layer.parameters(), None) is not None:
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # None: FSDP2 keeps the root's parameters gathered after forward (the head's backward comes first).
    fully_shard(model, reshard_after_forward=None, **kwargs)
    logger.info(
        "FSDP2 over %s mesh %s (%s)",
        "an HSDP" if dp_mesh.ndim == 2 else "a",
        dict(zip(dp_mesh.mesh_dim_names or (), dp_mesh.shape, strict=True)),
        "tensor-parallel model" if getattr(model, "_tensor_parallel", None) else "whole parameters",
    )
    return model
