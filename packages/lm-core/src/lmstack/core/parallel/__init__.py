"""lmstack.core.parallel: data, tensor, sequence and pipeline parallelism on torch.distributed.

Scale-out here is PyTorch's own engine only (DeviceMesh, DTensor's ``parallelize_module``, FSDP2's
``fully_shard``, ``torch.distributed.pipelining``) under torchrun's process group: gloo on CPU, NCCL
on CUDA. Nothing is home-made but the plans that say how lmstack's model is cut.

* :class:`ParallelDims` / :class:`ParallelMesh`: the degrees ``dp_replicate``, ``dp_shard``, ``tp``,
  ``sp``, ``pp`` and the named 5-D device mesh built from them.
* :func:`apply_tensor_parallel`: heads, feed-forward width and vocabulary split over ``tp`` (with the
  norms sequence-sharded, and a loss on vocabulary shards: :func:`tp_cross_entropy`);
  :func:`check_tensor_parallel` says beforehand whether a model's widths divide by a degree;
  :func:`apply_fsdp`: FSDP2 (or HSDP on a 2-D mesh) per decoder layer.
* :class:`UlyssesAttention` / :class:`RingAttention`: sequence-parallel attention backends over packed
  batches whose tokens are split over ``sp`` ranks (:func:`shard_sequence` with a
  :data:`SequenceLayout`; :func:`next_token_targets` shifts the labels on the full rows first).
* :func:`pipeline_split` / :func:`build_pipeline_schedule` (a :class:`Pipeline`) /
  :func:`pipeline_step`: the decoder stack cut into stages under torch's 1F1B, interleaved 1F1B or
  GPipe schedules.

The helpers behind these (slicing and gathering sequences, stage layer ranges, the pipeline loss, the
mesh's dim names) live in the private modules ``_mesh``, ``_tensor``, ``_sequence``, ``_ring`` and
``_pipeline``.
"""

from lmstack.core.parallel._fsdp import apply_fsdp
from lmstack.core.parallel._mesh import ParallelDims, ParallelMesh
from lmstack.core.parallel._pipeline import Pipeline, build_pipeline_schedule, pipeline_split, pipeline_step
from lmstack.core.parallel._ring import RingAttention
from lmstack.core.parallel._sequence import (
    SequenceLayout,
    UlyssesAttention,
    next_token_targets,
    shard_sequence,
)
from lmstack.core.parallel._tensor import apply_tensor_parallel, check_tensor_parallel, tp_cross_entropy

__all__ = [
    "ParallelDims",
    "ParallelMesh",
    "Pipeline",
    "RingAttention",
    "SequenceLayout",
    "UlyssesAttention",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_pipeline_schedule",
    "check_tensor_parallel",
    "next_token_targets",
    "pipeline_split",
    "pipeline_step",
    "shard_sequence",
    "tp_cross_entropy",
]
