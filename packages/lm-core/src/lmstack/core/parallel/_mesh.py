"""The device mesh: how ``world_size`` processes split into data, tensor, sequence and pipeline groups.

Every process of a ``torchrun`` job sits at one coordinate of a 5-D mesh, in this order (outermost
first, so that the innermost dims, which communicate most, land on the fastest links of a node):

``pp`` (pipeline stage) x ``dp_replicate`` (HSDP replicas) x ``dp_shard`` (FSDP2 shards)
x ``sp`` (sequence parallel: each rank holds a slice of every sequence) x ``tp`` (tensor parallel).

Dims of size 1 are kept, so ``mesh["tp"]`` always exists. Three flattened dims are added:
``dp`` (``dp_replicate`` x ``dp_shard``: ranks that read different batches), ``dp_shard_sp``
(``dp_shard`` x ``sp``: ranks over which FSDP2 shards parameters, since sequence-parallel ranks
compute gradients of the same parameters on different tokens) and ``dp_sp`` (every rank whose
tokens add up to the step's loss: the loss-token totals are summed over it).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from lmstack.core._errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["DIM_NAMES", "ParallelDims", "ParallelMesh", "torchrun_world_size"]

logger = logging.getLogger(__name__)

DIM_NAMES: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "sp", "tp")
"""The mesh dims, outermost first."""

_FLATTENED: dict[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_sp": ("dp_shard", "sp"),
    "dp_sp": ("dp_replicate", "dp_shard", "sp"),
}


@dataclass(frozen=True)
class ParallelDims:
    """The degree of each kind of parallelism; their product is the world size.

    Attributes:
        dp_replicate: Data-parallel replicas (with ``dp_shard`` > 1: HSDP, sharded within a replica
            group and replicated across groups).
        dp_shard: Data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2).
            ``-1`` takes whatever the other dims leave of the world size.
        tp: Tensor-parallel degree: each linear layer's weight split over this many ranks.
        sp: Sequence-parallel degree: each sequence's tokens split over this many ranks.
        pp: Pipeline stages: the decoder layers cut into this many consecutive groups.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sp: int = 1
    pp: int = 1

    def resolve(self, world_size: int) -> ParallelDims:
        """These dims with ``dp_shard=-1`` filled in, checked against ``world_size``.

        Raises:
            ConfigError: A degree is not a positive integer (``dp_shard`` may be -1), or the
                product of the degrees is not ``world_size``.
        """
        if world_size < 1:
            raise ConfigError(f"world_size must be at least 1, got {world_size}.")
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"parallel.{f.name} must be an integer, got {value!r}.")
            if value < 1 and not (f.name == "dp_shard" and value == -1):
                allowed = "a positive integer or -1 (the rest of the world size)"
                raise ConfigError(
                    f"parallel.{f.name} must be "
                    f"{allowed if f.name == 'dp_shard' else 'a positive integer'}, got {value}."
                )
        others = self.dp_replicate * self.tp * self.sp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if others > world_size:
                raise ConfigError(
                    f"parallel: dp_replicate x tp x sp x pp = {others} needs at least {others} processes "
                    f"but the world size is {world_size}; launch under torchrun with --nproc-per-node x "
                    f"--nnodes = {others} (or a multiple of it)."
                )
            if world_size % others:
                raise ConfigError(
                    f"parallel: dp_replicate x tp x sp x pp = {others} does not divide the world size "
                    f"{world_size}, so dp_shard=-1 cannot take the rest; choose degrees whose product "
                    f"divides {world_size}."
                )
            dp_shard = world_size // others
        resolved = replace(self, dp_shard=dp_shard)
        if resolved.world_size != world_size:
            raise ConfigError(
                f"parallel: {resolved.describe()} needs {resolved.world_size} processes but the world "
                f"size is {world_size}; launch torchrun with --nproc-per-node x --nnodes = "
                f"{resolved.world_size}, or set dp_shard: -1 to fill the world with data parallelism."
            )
        return resolved

    @property
    def world_size(self) -> int:
        """The number of processes these dims take (``dp_shard`` must be resolved)."""
        return math.prod(getattr(self, name) for name in DIM_NAMES)

    @property
    def dp(self) -> int:
        """Ranks that read different batches (``dp_replicate x dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        """``dp_replicate=1 dp_shard=2 tp=2 sp=1 pp=1``."""
        return " ".join(f"{name}={getattr(self, name)}" for name in DIM_NAMES[1:] + DIM_NAMES[:1])

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The 5-D device mesh of these (resolved) dims over the current process group.

        Args:
            device_type: ``cpu`` (gloo) or ``cuda`` (NCCL).

        Raises:
            ConfigError: No process group is initialised while the dims need more than one process,
                or the dims do not match its world size.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_initialized() else 1
        dims = self.resolve(world)
        if world > 1 or dist.is_initialized():
            mesh = init_device_mesh(
                device_type, tuple(getattr(dims, n) for n in DIM_NAMES), mesh_dim_names=DIM_NAMES
            )
            for flat, parts in _FLATTENED.items():
                mesh[parts]._flatten(flat)
        else:
            mesh = None
        return ParallelMesh(dims, mesh)


@dataclass
class ParallelMesh:
    """A :class:`ParallelDims` laid over the processes of a job.

    Attributes:
        dims: The resolved degrees.
        mesh: The 5-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dims named as in
            :data:`DIM_NAMES` plus the flattened ``dp``, ``dp_shard_sp`` and ``dp_sp``; None in a
            single process without a process group.
    """

    dims: ParallelDims
    mesh: DeviceMesh | None

    def __getitem__(self, name: str) -> DeviceMesh:
        """The 1-D sub-mesh ``name`` (a dim of :data:`DIM_NAMES` or a flattened one)."""
        if self.mesh is None:
            raise ConfigError(
                f"no device mesh in a single process without a process group (asked for {name!r})."
            )
        if name not in DIM_NAMES and name not in _FLATTENED:
            raise ConfigError(
                f"unknown mesh dim {name!r}; use one of {', '.join(DIM_NAMES + tuple(_FLATTENED))}."
            )
        return self.mesh[name]

    def size(self, name: str) -> int:
        """The size of dim ``name`` (1 without a mesh)."""
        if name in DIM_NAMES:
            return int(getattr(self.dims, name))
        if name not in _FLATTENED:
            raise ConfigError(f"unknown mesh dim {name!r}.")
        return math.prod(int(getattr(self.dims, part)) for part in _FLATTENED[name])

    def local_rank(self, name: str) -> int:
        """This process's coordinate along dim ``name`` (0 without a mesh)."""
        if self.mesh is None or self.size(name) == 1:
            return 0
        return int(self[name].get_local_rank())

    def enabled(self, name: str) -> bool:
        """Whether dim ``name`` has more than one rank."""
        return self.size(name) > 1

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over.

        ``dp_shard x sp`` (1-D), or with ``dp_replicate`` > 1 the 2-D HSDP mesh
        ``(dp_replicate, dp_shard x sp)``.
        """
        if self.mesh is None:
            raise ConfigError("no device mesh in a single process without a process group.")
        if self.dims.dp_replicate == 1:
            return self.mesh["dp_shard_sp"]
        # Without sequence parallelism the mesh's own dims serve (no slice of a flattened dim).
        return self.mesh["dp_replicate", "dp_shard" if self.dims.sp == 1 else "dp_shard_sp"]

    @property
    def dp_rank(self) -> int:
        """Which batch this process reads (its coordinate in the flattened ``dp`` dim)."""
        return self.local_rank("dp")

    @property
    def dp_size(self) -> int:
        """How many different batches a step reads."""
        return self.size("dp")


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
