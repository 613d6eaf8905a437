"""lmstack.core.parallel: data, tensor, sequence and pipeline parallelism on torch.distributed.

Scale-out here is PyTorch's own engine only (DeviceMesh, DTensor's ``parallelize_module``, FSDP2's
``fully_shard``, ``torch.distributed.pipelining``) under torchrun's process group: gloo on CPU, NCCL
on CUDA. Nothing is home-made but the plans that say how lmstack's model is cut.

* :class:`ParallelDims` / :class:`ParallelMesh`: the degrees ``dp_replicate``, ``dp_shard``, ``tp``,
  ``sp``, ``pp`` and the named 5-D device mesh built from them.
"""

from lmstack.core.parallel._mesh import DIM_NAMES, ParallelDims, ParallelMesh, torchrun_world_size

__all__ = ["DIM_NAMES", "ParallelDims", "ParallelMesh", "torchrun_world_size"]
