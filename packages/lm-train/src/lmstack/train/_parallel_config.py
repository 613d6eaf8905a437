"""The ``parallel:`` section every recipe's YAML accepts: how torchrun's processes split the work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmstack.core.parallel import ParallelDims
from lmstack.train.data._errors import TrainConfigError

__all__ = ["ParallelConfig"]


@dataclass
class ParallelConfig:
    """Data, tensor, sequence and pipeline parallelism over the processes torchrun starts.

    The product ``dp_replicate x dp_shard x tp x sp x pp`` is the world size; ``dp_shard: -1`` takes
    what the others leave. Left at its defaults, the run is data parallel as ``run.data_parallel``
    says (``ddp``: ``dp_replicate`` = world size with whole replicas; ``fsdp``: ``dp_shard`` = world
    size); any other setting builds the 5-D device mesh of :mod:`lmstack.core.parallel`, shards
    parameters with FSDP2 over ``dp_shard x sp`` (HSDP across ``dp_replicate``) and writes distributed
    checkpoints that resume under any other layout.

    Attributes:
        dp_replicate: Data-parallel replica groups (HSDP).
        dp_shard: Data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2).
        tp: Tensor-parallel degree (heads, the feed-forward width and the vocabulary split).
        sp: Sequence-parallel degree (each packed sequence's tokens split; attention communicates).
        pp: Pipeline stages (the decoder layers cut into consecutive groups).
        sequence_parallel: With ``tp``: keep the norms and the residual stream sharded on the
            sequence between the tensor-parallel blocks (activation memory divided by ``tp``).
        sp_attention: How sequence-parallel attention communicates: ``ulysses`` (two all-to-alls per
            layer, heads split) or ``ring`` (keys and values passed around the ranks: sequences longer
            than one rank holds).
        pp_schedule: ``1f1b``, ``interleaved`` (1F1B over several stages per rank: a smaller bubble)
            or ``gpipe``.
        pp_stages_per_rank: Stages each pipeline rank holds (``interleaved`` needs at least 2).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    sp_attention: Literal["ulysses", "ring"] = "ulysses"
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    pp_stages_per_rank: int = 1

    @property
    def dims(self) -> ParallelDims:
        """The degrees as lmstack-core's :class:`~lmstack.core.parallel.ParallelDims`."""
        return ParallelDims(self.dp_replicate, self.dp_shard, self.tp, self.sp, self.pp)

    @property
    def is_default(self) -> bool:
        """Whether only data parallelism is asked for (``run.data_parallel`` then decides how)."""
        return (self.dp_replicate, self.dp_shard, self.tp, self.sp, self.pp) == (1, -1, 1, 1, 1)

    def check(self) -> None:
        """Settings that do not fit together, named with the fix.

        Raises:
            TrainConfigError: An interleaved schedule with one stage per rank, stages per rank below 1,
                or an unknown choice.
        """
        if self.pp_stages_per_rank < 1:
            raise TrainConfigError(
                f"parallel.pp_stages_per_rank must be at least 1, got {self.pp_stages_per_rank}.",
                field="parallel.pp_stages_per_rank",
            )
        if self.pp_schedule == "interleaved" and self.pp_stages_per_rank < 2:
            raise TrainConfigError(
                "parallel.pp_schedule 'interleaved' needs parallel.pp_stages_per_rank of 2 or more; "
                "set it, or use pp_schedule: 1f1b.",
                field="parallel.pp_schedule",
            )
        if self.pp_schedule != "interleaved" and self.pp_stages_per_rank > 1:
            raise TrainConfigError(
                f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} needs pp_schedule: interleaved.",
                field="parallel.pp_stages_per_rank",
            )
        if self.sp_attention not in ("ulysses", "ring"):
            raise TrainConfigError(
                f"parallel.sp_attention must be ulysses or ring, got {self.sp_attention!r}.",
                field="parallel.sp_attention",
            )
