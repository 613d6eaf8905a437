"""Data parallelism under ``torchrun``: one process per device, gradients averaged by DDP.

Scale-out rides torch.distributed only: the process group comes from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), with the gloo backend on CPU and
NCCL on CUDA. A plain ``python`` run is world size 1 and touches no process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmstack.train._errors import TrainError

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "init_distributed"]

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
