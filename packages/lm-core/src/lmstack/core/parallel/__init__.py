"""lmstack.core.parallel: data, tensor, sequence and pipeline parallelism on torch.distributed.

Scale-out here is PyTorch's own engine only (DeviceMesh, DTensor's ``parallelize_module``, FSDP2's
``fully_shard``, ``torch.distributed.pipelining``) under torchrun's process group: gloo on CPU, NCCL
on CUDA. Nothing is home-made but the plans that say how lmstack's model is cut.

* :class:`ParallelDims` / :class:`ParallelMesh`: the degrees ``dp_replicate``, ``dp_shard``, ``tp``,
  ``sp``, ``pp`` and the named 5-D device mesh built from them.
* :func:`apply_tensor_parallel`: heads, feed-forward width and vocabulary split over ``tp`` (with the
  norms sequence-sharded, and a loss on vocabulary shards: :func:`tp_cross_entropy`);
  :func:`apply_fsdp`: FSDP2 (or HSDP on a 2-D mesh) per decoder layer.
* :class:`UlyssesAttention` / :class:`RingAttention`: sequence-parallel attention backends over packed
  batches whose tokens are split over ``sp`` ranks (:func:`shard_sequence`).
* :func:`pipeline_split` / :func:`build_pipeline_schedule` / :func:`pipeline_step`: the decoder stack
  cut into stages under torch's 1F1B, interleaved 1F1B or GPipe schedules.
"""

from lmstack.core.parallel._fsdp import apply_fsdp
from lmstack.core.parallel._mesh import DIM_NAMES, ParallelDims, ParallelMesh, torchrun_world_size
from lmstack.core.parallel._pipeline import (
    Pipeline,
    PipelineStageModule,
    build_pipeline_schedule,
    pipeline_lm_loss,
    pipeline_split,
    pipeline_step,
    stage_layer_ranges,
)
from lmstack.core.parallel._ring import RingAttention
from lmstack.core.parallel._sequence import (
    SequenceGroup,
    SequenceLayout,
    UlyssesAttention,
    gather_sequence,
    next_token_targets,
    sequence_chunks,
    sequence_token_index,
    shard_sequence,
    unshard_sequence,
)
from lmstack.core.parallel._tensor import (
    apply_tensor_parallel,
    check_sequence_length,
    check_tensor_parallel,
    tp_cross_entropy,
)

__all__ = [
    "DIM_NAMES",
    "ParallelDims",
    "ParallelMesh",
    "Pipeline",
    "PipelineStageModule",
    "RingAttention",
    "SequenceGroup",
    "SequenceLayout",
    "UlyssesAttention",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_pipeline_schedule",
    "check_sequence_length",
    "check_tensor_parallel",
    "gather_sequence",
    "next_token_targets",
    "pipeline_lm_loss",
    "pipeline_split",
    "pipeline_step",
    "sequence_chunks",
    "sequence_token_index",
    "shard_sequence",
    "stage_layer_ranges",
    "torchrun_world_size",
    "tp_cross_entropy",
    "unshard_sequence",
]
