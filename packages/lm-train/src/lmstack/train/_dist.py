"""Data parallelism under ``torchrun``: one process per device, gradients averaged by DDP or FSDP2.

Scale-out rides torch.distributed only: the process group comes from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), with the gloo backend on CPU and
NCCL on CUDA. A plain ``python`` run is world size 1 and touches no process group.

Two ways to spread a model over the ranks (:func:`wrap_data_parallel`):

* ``ddp``: every rank holds the whole model and optimizer; ``DistributedDataParallel`` all-reduces
  (averages) gradients during backward.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter, gradient and
  optimizer state over the ranks: each decoder layer is one unit (all-gathered just before its
  forward and backward, freed after), the root holds the embeddings, final norm and output head.
  Parameters become ``DTensor`` shards; gradients are reduce-scattered with an average, exactly
  the gradient DDP produces. Runs on CPU with gloo (torch 2.13 has the reduce-scatter and
  all-gather FSDP2 needs) and on CUDA with NCCL.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmstack.core import CausalLM
from lmstack.train.data._errors import TrainError

__all__ = [
    "DataParallel",
    "DistInfo",
    "all_reduce_max",
    "all_reduce_sum",
    "all_reduce_sums",
    "all_reduce_tensor_sum",
    "barrier",
    "init_distributed",
    "scalar_value",
    "wrap_data_parallel",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (checkpoints, metrics, the final model)."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by torchrun (idempotent); pick this rank's device.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("run.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'.")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        logger.info("joined process group: rank %d of %d on %s", rank, world, dev)
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a number over every rank (itself outside a process group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum several numbers over every rank in one collective (themselves outside a process group)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def all_reduce_tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank (a new tensor; the tensor itself outside a process group)."""
    if not dist.is_initialized():
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest value of a number over every rank (itself outside a process group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def scalar_value(value: torch.Tensor) -> float:
    """A one-element tensor's value; a DTensor (as FSDP2's gradient norm is) is made whole first."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            value = value.full_tensor()
    return float(value)


@dataclass
class DataParallel:
    """A model as the training loop drives it, however it is spread over the ranks.

    Attributes:
        module: What to call forward on (the DDP wrapper, or the model itself).
        mode: ``none`` (one process), ``ddp``, ``fsdp``, or ``mesh`` (a ``parallel:`` layout: the model
            is parallelised in place and :class:`lmstack.train._parallel.MeshModel` drives it).
    """

    module: nn.Module
    mode: Literal["none", "ddp", "fsdp", "mesh"]

    @property
    def sharded(self) -> bool:
        """Whether parameters and optimizer states are FSDP shards (DTensors), not whole tensors."""
        return self.mode in ("fsdp", "mesh")

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Run a micro-batch's backward with (last micro-batch) or without gradient communication.

        Without it gradients accumulate locally, so a step of ``grad_accum`` micro-batches
        communicates once.
        """
        if self.mode == "ddp" and not enabled:
            assert isinstance(self.module, DistributedDataParallel)
            with self.module.no_sync():
                yield
            return
        if self.mode == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(self.module, FSDPModule)
            self.module.set_requires_gradient_sync(enabled)
        yield


def wrap_data_parallel(
    model: CausalLM, info: DistInfo, mode: Literal["ddp", "fsdp"], *, mixed_precision: bool = False
) -> DataParallel:
    """Spread ``model`` (already on ``info.device``) over the ranks; a no-op for one process.

    With ``fsdp`` the model is sharded in place (its class becomes an FSDP subclass and its
    parameters DTensors), so build the optimizer from its parameters *after* this call.

    Args:
        model: The model to train.
        info: This process's place in the run.
        mode: ``ddp`` or ``fsdp``.
        mixed_precision: ``fsdp`` only: FSDP2 mixed precision (bf16 weights gathered and computed
            with, gradients reduced in fp32 into the fp32 shards the optimizer steps).

    Returns:
        The model as the loop drives it.
    """
    if info.world_size == 1:
        return DataParallel(model, "none")
    if mode == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DataParallel(DistributedDataParallel(model, device_ids=ids), "ddp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lmstack.core.parallel import apply_fsdp

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else None
    )
    # Core's units: one per decoder layer (bounding the unsharded memory to one layer at a time), and a
    # root for the rest (embeddings, final norm, output head; a tied head shares one shard).
    mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp_shard",))
    apply_fsdp(model, mesh, mp_policy=policy)
    return DataParallel(model, "fsdp")
