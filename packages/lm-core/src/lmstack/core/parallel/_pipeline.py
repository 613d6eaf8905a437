"""Pipeline parallelism: the decoder stack cut into stages on ``torch.distributed.pipelining``.

The model is cut into ``pp * stages_per_rank`` stages of consecutive decoder layers
(:func:`pipeline_split`); rank ``r`` of the ``pp`` mesh dim holds stages ``r, r + pp, ...`` (the
"loop" order that torch's interleaved schedules expect). Each stage is a
:class:`PipelineStageModule` whose parameters keep the whole model's names
(``model.layers.N.*`` with ``N`` the global layer index, ``model.embed_tokens`` on the first stage,
``model.norm`` and ``lm_head`` on the last), so that state dicts and distributed checkpoints of the
stages line up with the model's own.

What travels between stages is the hidden state ``[B, T, C]`` alone. Positions (and the labels) reach
every stage as keyword arguments of the schedule's ``step``, which torch splits into microbatches
like the positional inputs and hands to every stage; each stage rebuilds its attention context
(:meth:`PackedAttention.from_positions`) and RoPE tables from them, which costs a scan of the
positions per stage and microbatch and no communication.

The loss follows lmstack's normalisation: the sum of the step's token cross-entropies divided by the
step's total loss-token count, not a mean of microbatch means. Each microbatch's loss is its sum over
that total, and the schedule is built with ``scale_grads=False`` so torch adds the microbatch
gradients without dividing them by the number of microbatches.

:func:`build_pipeline_schedule` wraps the stages in torch's ``PipelineStage`` and one of
``Schedule1F1B``, ``ScheduleInterleaved1F1B`` or ``ScheduleGPipe``; :func:`pipeline_step` runs one
forward and backward over a batch and returns the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from lmstack.core._errors import ConfigError, LMStackError
from lmstack.core.model import _transformer
from lmstack.core.model._attention import AttentionBackend, PackedAttention, PackedImpl
from lmstack.core.model._transformer import CausalLM, DecoderLayer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining.schedules import _PipelineSchedule
    from torch.distributed.pipelining.stage import PipelineStage, _PipelineStageBase

__all__ = [
    "IGNORE_INDEX",
    "Pipeline",
    "PipelineLoss",
    "PipelineStageModule",
    "ScheduleName",
    "build_pipeline_schedule",
    "loss_rows",
    "pipeline_lm_loss",
    "pipeline_split",
    "pipeline_step",
    "stage_layer_ranges",
    "stages_of_rank",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""The label of a token that carries no loss (as in lmstack-train's batches)."""

ScheduleName = Literal["1f1b", "interleaved", "gpipe"]
"""The pipeline schedules :func:`build_pipeline_schedule` offers."""

PipelineLoss = Callable[..., Tensor]
"""``loss_fn(last_stage_output, labels, *, num_loss_tokens) -> scalar`` for one microbatch."""


# ------------------------------------------------------------------------------------------------
# the split
# ------------------------------------------------------------------------------------------------


def stage_layer_ranges(
    num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[range]:
    """The global decoder-layer indices of each stage, consecutive and covering every layer once.

    Args:
        num_layers: Decoder layers of the model.
        num_stages: Stages to cut them into.
        layers_per_stage: Explicit layer counts, one per stage (each at least 1, summing to
            ``num_layers``); None balances them, earlier stages taking one more where the count
            does not divide.

    Raises:
        ConfigError: Fewer layers than stages, or explicit counts that do not fit.
    """
    if num_stages < 1:
        raise ConfigError(f"a pipeline needs at least one stage, got {num_stages}.")
    if layers_per_stage is None:
        if num_layers < num_stages:
            raise ConfigError(
                f"pipeline: {num_stages} stages but the model has only {num_layers} decoder layers; "
                f"every stage needs at least one layer, so lower parallel.pp (or stages_per_rank)."
            )
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if i < extra else 0) for i in range(num_stages)]
    else:
        counts = [int(n) for n in layers_per_stage]
        if len(counts) != num_stages:
            raise ConfigError(
                f"pipeline: layers_per_stage has {len(counts)} entries but there are {num_stages} stages "
                f"(pp * stages_per_rank); give one count per stage."
            )
        if any(n < 1 for n in counts) or sum(counts) != num_layers:
            raise ConfigError(
                f"pipeline: layers_per_stage {counts} must be positive counts summing to the model's "
                f"{num_layers} decoder layers."
            )
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def stages_of_rank(rank: int, pp: int, stages_per_rank: int = 1) -> list[int]:
    """The stage indices pipeline rank ``rank`` holds: ``rank, rank + pp, ...`` (torch's loop order)."""
    return [rank + k * pp for k in range(stages_per_rank)]


class _NotOwned(nn.Module):
    """Stands in for a decoder layer that lives on another stage: no parameters, never called."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise LMStackError(f"decoder layer {self.layer} belongs to another pipeline stage.")

    def extra_repr(self) -> str:
        return f"layer={self.layer} (on another stage)"


class _StageBody(nn.Module):
    """A stage's part of :class:`~lmstack.core.model._transformer.Transformer` (the ``model.`` prefix).

    ``layers`` keeps one entry per decoder layer of the whole model, the stage's own layers at their
    global index and parameter-less placeholders elsewhere, so parameter names stay global.
    """

    def __init__(self, model: CausalLM, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        body = model.model
        self.embed_tokens: nn.Embedding | None = body.embed_tokens if first else None
        self.layers = nn.ModuleList(
            body.layers[i] if i in layers else _NotOwned(i) for i in range(len(body.layers))
        )
        self.norm: nn.Module | None = body.norm if last else None
        self.rotary = body.rotary  # no parameters or buffers: a table cache only
        self.activation_checkpointing = body.activation_checkpointing


class PipelineStageModule(nn.Module):
    """One pipeline stage of a :class:`~lmstack.core.CausalLM`: some consecutive decoder layers.

    The stage shares its modules (and so its parameters) with the model it was cut from; nothing is
    copied. Parameter names are the model's own: ``model.layers.N.*`` for the layers it holds,
    ``model.embed_tokens.weight`` on the first stage only, ``model.norm.weight`` and
    ``lm_head.weight`` on the last only.

    Forward (what torch's ``PipelineStage`` calls per microbatch): the first stage takes token ids
    ``[B, T]``, the others the previous stage's hidden states ``[B, T, C]``; every stage takes
    ``positions`` ``[B, T]`` (restarting at 0 for each packed sample) and rebuilds the packed
    attention and RoPE from them. Middle stages return hidden states ``[B, T, C]``. The last stage
    returns logits: ``[N, V]`` for the ``N`` tokens whose next token carries loss when ``labels`` are
    given (see :func:`loss_rows`; the last decoder layer then computes those rows only, as
    ``CausalLM.forward`` does with ``logits_indices``), else ``[B, T, V]``.

    Args:
        model: The whole model (its ``tie_word_embeddings`` must be off when there is more than one
            stage).
        stage_index: This stage's index, ``0 <= stage_index < len(layer_ranges)``.
        layer_ranges: The global layer indices of every stage (:func:`stage_layer_ranges`).
        pp_mesh: The 1-D pipeline mesh the stage communicates over (None only for a stage that
            never runs in a schedule, as in single-process tests).
        attention_impl: The :class:`PackedAttention` implementation to build on every stage.
        sp_mesh: With sequence parallelism, the 1-D ``sp`` mesh: each rank then runs the stage on its
            slice of every row (see :meth:`forward`), attention communicating over it.
        sp_attention: ``ulysses`` (rows sliced contiguously) or ``ring`` (zigzag slices).

    Attributes:
        config: The model's configuration.
        stage_index: This stage's index.
        num_stages: Stages of the whole pipeline.
        layer_ids: The global indices of the decoder layers this stage holds.
        pp_mesh: As given.

    Raises:
        ConfigError: Tied embeddings with more than one stage, a model prepared for inference, or
            ranges that do not cover the model's layers.
    """

    def __init__(
        self,
        model: CausalLM,
        stage_index: int,
        layer_ranges: Sequence[range],
        pp_mesh: DeviceMesh | None = None,
        *,
        attention_impl: PackedImpl = "auto",
        sp_mesh: DeviceMesh | None = None,
        sp_attention: Literal["ulysses", "ring"] = "ulysses",
    ) -> None:
        super().__init__()
        num_stages = len(layer_ranges)
        _check_splittable(model, layer_ranges)
        if not 0 <= stage_index < num_stages:
            raise ConfigError(f"stage_index {stage_index} is outside the {num_stages} pipeline stages.")
        self.config = model.config
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.layer_ids: tuple[int, ...] = tuple(layer_ranges[stage_index])
        self.pp_mesh = pp_mesh
        self.attention_impl: PackedImpl = attention_impl
        self.sp_mesh = sp_mesh if sp_mesh is not None and sp_mesh.size() > 1 else None
        if sp_attention not in ("ulysses", "ring"):
            raise ConfigError(f"sp_attention must be ulysses or ring, got {sp_attention!r}.")
        self.sp_attention = sp_attention
        first, last = stage_index == 0, stage_index == num_stages - 1
        self.model = _StageBody(model, layer_ranges[stage_index], first, last)
        self.lm_head: nn.Module | None = model.lm_head if last else None
        # A model cut after tensor parallelism: with its sequence-parallel residual stream, each
        # layer's input is a slice of every row (so no rows-only last layer, and the final norm's
        # output is gathered whole before the head).
        self._tensor_parallel: str | None = getattr(model, "_tensor_parallel", None)

    @property
    def is_first(self) -> bool:
        """Whether this stage takes the token ids (and holds the embedding)."""
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage holds the final norm and the output head."""
        return self.stage_index == self.num_stages - 1

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers this stage holds, in order (without the placeholders)."""
        return [self.model.layers[i] for i in self.layer_ids]  # type: ignore[misc]

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.model.activation_checkpointing = enabled

    def _rows_only(self, attn: AttentionBackend, rows: Tensor, tokens: int) -> bool:
        """Whether the last layer may run on the loss rows alone (``CausalLM._rows_only``'s rule)."""
        if not 0 < rows.numel() <= _transformer.ROWS_ONLY_MAX_SHARE * tokens:
            return False
        if self._tensor_parallel == "sequence":
            return False
        supports_rows = getattr(attn, "supports_rows", None)  # sequence-parallel backends have no rows path
        if supports_rows is None or not supports_rows() or rows.device.type != "cpu":
            return False
        # A compiled layer would see a rows tensor of a new length every microbatch and recompile.
        return getattr(self.model.layers[self.layer_ids[-1]], "_compiled_call_impl", None) is None

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        labels: Tensor | None = None,
        rope_seq_lens: Tensor | None = None,
        sequence_positions: Tensor | None = None,
    ) -> Tensor:
        """Run this stage on one microbatch (see the class docstring for shapes).

        With sequence parallelism (``sp_mesh``) every per-token tensor is this rank's slice of the
        rows (``T / sp`` tokens, cut by :func:`~lmstack.core.parallel.shard_sequence`), ``labels`` are
        the slice of the next-token targets made on the whole rows
        (:func:`~lmstack.core.parallel.next_token_targets`), and ``sequence_positions`` are the whole
        rows' positions, from which the packed samples' boundaries are read.

        Args:
            x: Token ids ``[B, T]`` (first stage) or hidden states ``[B, T, C]``.
            positions: ``[B, T]`` positions restarting at 0 for every packed sample.
            labels: ``[B, T]`` unshifted labels (:data:`IGNORE_INDEX` for no loss): the last stage then
                returns the logits of the loss rows only. Ignored by the other stages.
            rope_seq_lens: For dynamic NTK RoPE, each token's sequence length ``[B, T]``.
            sequence_positions: Sequence parallelism only: the whole rows' positions ``[B, T * sp]``.

        Raises:
            ConfigError: A sequence-parallel stage without ``sequence_positions``.
        """
        body = self.model
        h = body.embed_tokens(x) if body.embed_tokens is not None else x  # [B, T, C]
        cos, sin = body.rotary(positions, rope_seq_lens, dtype=h.dtype)
        attn: AttentionBackend
        if self.sp_mesh is None:
            attn = PackedAttention.from_positions(positions, impl=self.attention_impl)
            rows = loss_rows(labels) if self.is_last and labels is not None else None
        else:
            if sequence_positions is None:
                raise ConfigError(
                    "a sequence-parallel pipeline stage needs sequence_positions (the whole rows' "
                    "positions) to find the packed samples; pass them to pipeline_step."
                )
            from lmstack.core.parallel._ring import RingAttention
            from lmstack.core.parallel._sequence import UlyssesAttention

            cu = PackedAttention.from_positions(sequence_positions).cu_seqlens
            if self.sp_attention == "ring":
                attn = RingAttention(cu, self.sp_mesh, layout="zigzag")
            else:
                attn = UlyssesAttention(cu, self.sp_mesh, layout="contiguous", impl=self.attention_impl)
            rows = None
            if self.is_last and labels is not None:  # next-token targets already
                rows = (labels.reshape(-1) != IGNORE_INDEX).nonzero().flatten()
        rows_only = rows is not None and self._rows_only(attn, rows, positions.numel())
        last = self.layer_ids[-1]
        for i in self.layer_ids:
            layer = body.layers[i]
            extra = (rows,) if rows_only and i == last else ()
            if body.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, attn, *extra, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn, *extra)
        if not self.is_last:
            return h
        assert body.norm is not None and self.lm_head is not None
        h = body.norm(h)
        if isinstance(h, DTensor):  # sequence-parallel norm: gather the rows whole for the head
            h = h.full_tensor()
        if rows is not None and not rows_only:
            h = h.reshape(-1, h.shape[-1])[rows]  # [N, C]
        return self.lm_head(h)  # type: ignore[no-any-return]


def _check_splittable(model: CausalLM, layer_ranges: Sequence[range]) -> None:
    num_layers = len(model.model.layers)
    covered = [i for r in layer_ranges for i in r]
    if covered != list(range(num_layers)) or any(len(r) == 0 for r in layer_ranges):
        raise ConfigError(
            f"pipeline stages must hold consecutive, non-empty runs of the model's {num_layers} decoder "
            f"layers covering each once; got {[(r.start, r.stop) for r in layer_ranges]}."
        )
    tied = model.config.tie_word_embeddings or model.lm_head.weight is model.model.embed_tokens.weight
    if tied and len(layer_ranges) > 1:
        raise ConfigError(
            "pipeline parallelism cannot split a model with tie_word_embeddings: the embedding (first "
            "stage) and the output head (last stage) would share one weight across ranks. Untie them "
            "(copy the embedding into lm_head and set tie_word_embeddings false) or use pp=1.",
            field="tie_word_embeddings",
        )
    if model.inference_layout is not None:
        raise ConfigError("pipeline_split needs a training model, not one prepared for inference.")


def pipeline_split(
    model: CausalLM,
    pp_mesh: DeviceMesh,
    *,
    stages_per_rank: int = 1,
    layers_per_stage: Sequence[int] | None = None,
    attention_impl: PackedImpl = "auto",
    sp_mesh: DeviceMesh | None = None,
    sp_attention: Literal["ulysses", "ring"] = "ulysses",
) -> list[PipelineStageModule]:
    """Cut ``model`` into ``pp * stages_per_rank`` stages and return this rank's, in stage order.

    Rank ``r`` of ``pp_mesh`` holds stages ``r, r + pp, ...`` (one stage per rank for 1F1B and
    GPipe; more for the interleaved schedule). The stages share their modules with ``model``: drop
    the reference to ``model`` afterwards and only this rank's layers stay alive. Apply tensor
    parallelism, FSDP2 and activation checkpointing to the returned modules, then hand them to
    :func:`build_pipeline_schedule`.

    Args:
        model: The whole model, on this rank's device (or ``meta``, to be materialised per stage).
        pp_mesh: The 1-D pipeline mesh (``ParallelMesh["pp"]``).
        stages_per_rank: Stages each rank holds (virtual stages of the interleaved schedule).
        layers_per_stage: Explicit decoder-layer counts per stage (see :func:`stage_layer_ranges`).
        attention_impl: The :class:`PackedAttention` implementation the stages build.
        sp_mesh: Sequence parallelism within each stage: the 1-D ``sp`` mesh (see
            :class:`PipelineStageModule`).
        sp_attention: ``ulysses`` or ``ring`` attention over ``sp_mesh``.

    Raises:
        ConfigError: Tied embeddings with more than one stage, too few layers, bad explicit counts,
            a mesh that is not 1-D.
    """
    if pp_mesh.ndim != 1:
        raise ConfigError(f"pipeline_split needs the 1-D pp mesh dim, got a {pp_mesh.ndim}-D mesh.")
    if stages_per_rank < 1:
        raise ConfigError(f"stages_per_rank must be at least 1, got {stages_per_rank}.")
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    ranges = stage_layer_ranges(len(model.model.layers), pp * stages_per_rank, layers_per_stage)
    stages = [
        PipelineStageModule(
            model,
            s,
            ranges,
            pp_mesh,
            attention_impl=attention_impl,
            sp_mesh=sp_mesh,
            sp_attention=sp_attention,
        )
        for s in stages_of_rank(rank, pp, stages_per_rank)
    ]
    logger.info(
        "pipeline: rank %d of %d holds stage(s) %s with decoder layers %s",
        rank, pp, [s.stage_index for s in stages], [list(s.layer_ids) for s in stages],
    )  # fmt: skip
    return stages


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------


def loss_rows(labels: Tensor) -> Tensor:
    """Flat indices into the ``B * T`` positions whose next token carries loss, in row-major order.

    ``labels`` are unshifted (``[B, T]``, as lmstack's batches hold them): position ``t`` of a row
    predicts ``labels[t + 1]``, so the last position of a row never carries loss.
    """
    target = labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def pipeline_lm_loss(
    output: Tensor, labels: Tensor, *, num_loss_tokens: float, shifted: bool = False
) -> Tensor:
    """The summed next-token cross-entropy of one microbatch, divided by the step's loss tokens.

    Summed over a step's microbatches (torch's schedules add their gradients when built with
    ``scale_grads=False``) this is the whole batch's mean token loss, whatever the microbatch sizes.

    Args:
        output: The last stage's logits: ``[N, V]`` for the :func:`loss_rows` of ``labels`` or
            ``[B, T, V]`` for every position.
        labels: ``[B, T]`` unshifted labels of the microbatch, or with ``shifted`` its next-token
            targets (sequence parallelism: a slice of the targets made on the whole rows).
        num_loss_tokens: The step's total loss-token count (over every microbatch, and every
            data-parallel rank divided by the data-parallel degree when gradients are averaged over it).
        shifted: ``labels`` are next-token targets already.
    """
    target = labels if shifted else labels[:, 1:]
    if output.dim() == 3:
        logits = (output if shifted else output[:, :-1]).reshape(-1, output.shape[-1])
        summed = F.cross_entropy(
            logits.float(), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    else:
        summed = F.cross_entropy(output.float(), target[target != IGNORE_INDEX], reduction="sum")
    return summed / num_loss_tokens


# ------------------------------------------------------------------------------------------------
# the schedule and a step
# ------------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """This rank's stages under one of torch's pipeline schedules (:func:`build_pipeline_schedule`).

    The schedule infers the shapes that travel between stages from the first microbatch it sees;
    :func:`pipeline_step` builds a fresh schedule when the batch shape changes (fixed-length packed
    rows keep one).

    Attributes:
        modules: This rank's :class:`PipelineStageModule` (possibly wrapped by TP/FSDP2), in stage order.
        n_microbatches: Microbatches a step is split into (along the rows).
        schedule_name: ``1f1b``, ``interleaved`` or ``gpipe``.
        loss_fn: ``loss_fn(output, labels, *, num_loss_tokens)`` on the last stage.
        device: Where the stages compute.
        schedule: torch's schedule object (rebuilt on a new batch shape).
        stages: torch's ``PipelineStage`` objects around ``modules``.
    """

    modules: list[PipelineStageModule]
    n_microbatches: int
    schedule_name: ScheduleName
    loss_fn: PipelineLoss
    device: torch.device
    schedule: _PipelineSchedule = field(init=False)
    stages: list[PipelineStage] = field(init=False)
    _shape: tuple[int, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._build()

    @property
    def pp_mesh(self) -> DeviceMesh:
        """The 1-D pipeline mesh."""
        mesh = self.modules[0].pp_mesh
        assert mesh is not None
        return mesh

    @property
    def has_first_stage(self) -> bool:
        """Whether this rank runs the first stage (and so needs the token ids)."""
        return any(m.is_first for m in self.modules)

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank runs the last stage (and so computes the loss)."""
        return any(m.is_last for m in self.modules)

    def _build(self) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        group = self.pp_mesh.get_group()
        self.stages = [
            PipelineStage(m, m.stage_index, m.num_stages, self.device, group=group) for m in self.modules
        ]
        # scale_grads=False: each microbatch's loss is already its share of the step's loss.
        if self.schedule_name == "interleaved":
            stages: list[_PipelineStageBase] = list(self.stages)
            self.schedule = ScheduleInterleaved1F1B(
                stages, self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False
            )
        else:
            cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
            self.schedule = cls(self.stages[0], self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False)


def build_pipeline_schedule(
    stages: Sequence[PipelineStageModule],
    *,
    n_microbatches: int,
    loss_fn: PipelineLoss = pipeline_lm_loss,
    schedule: ScheduleName = "1f1b",
    device: torch.device | str | None = None,
) -> Pipeline:
    """Wrap this rank's stages in torch's ``PipelineStage`` and a schedule.

    Args:
        stages: What :func:`pipeline_split` returned on this rank (after TP/FSDP2, if any).
        n_microbatches: Microbatches per step; the batch's rows are split evenly among them.
        loss_fn: ``loss_fn(last_stage_output, labels, *, num_loss_tokens)`` for one microbatch
            (``labels`` are :func:`pipeline_step`'s ``loss_targets`` when given; with
            sequence-parallel stages it is also passed ``shifted=True``); it must return that
            microbatch's share of the step loss (see :func:`pipeline_lm_loss`): the schedule adds the
            microbatch gradients without rescaling them. torch's schedule also calls it once on
            placeholder outputs in the first step, to infer the gradients' shapes.
        schedule: ``1f1b`` (one stage per rank, ``n_microbatches >= pp``), ``gpipe`` (one stage per
            rank: all forwards, then all backwards) or ``interleaved`` (interleaved 1F1B over
            ``stages_per_rank`` stages per rank).
        device: Where the stages compute (default: where their parameters are).

    Raises:
        ConfigError: An unknown schedule, a stage count the schedule cannot run, too few
            microbatches, or stages without a pipeline mesh.
    """
    if not stages:
        raise ConfigError("build_pipeline_schedule needs this rank's stages (from pipeline_split).")
    if schedule not in ("1f1b", "interleaved", "gpipe"):
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; use 1f1b, interleaved or gpipe.")
    if any(s.pp_mesh is None for s in stages):
        raise ConfigError("pipeline stages need the pp mesh; build them with pipeline_split.")
    pp = stages[0].pp_mesh.size()  # type: ignore[union-attr]
    if n_microbatches < 1:
        raise ConfigError(f"n_microbatches must be at least 1, got {n_microbatches}.")
    if schedule != "interleaved" and len(stages) != 1:
        raise ConfigError(
            f"the {schedule} schedule runs one stage per rank but this rank holds {len(stages)}; "
            "use schedule='interleaved' or stages_per_rank=1."
        )
    if schedule == "1f1b" and n_microbatches < pp:
        raise ConfigError(f"the 1f1b schedule needs n_microbatches >= pp ({pp}), got {n_microbatches}.")
    if schedule == "interleaved":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(
                f"the interleaved schedule needs n_microbatches to be a multiple of max(1, n_microbatches "
                f"// pp) = {rounds}, got {n_microbatches}; a multiple of pp ({pp}) works."
            )
    if device is None:
        param = next(iter(stages[0].parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    return Pipeline(list(stages), n_microbatches, schedule, loss_fn, torch.device(device))


def pipeline_step(
    pipeline: Pipeline,
    input_ids: Tensor,
    positions: Tensor,
    labels: Tensor,
    *,
    num_loss_tokens: float | None = None,
    rope_seq_lens: Tensor | None = None,
    broadcast_loss: bool = True,
    sequence_positions: Tensor | None = None,
    loss_targets: Tensor | None = None,
) -> Tensor:
    """One forward and backward of a packed batch through the pipeline; gradients accumulate.

    Every rank of the pipeline calls it with the same batch (ranks of one ``pp`` group read the same
    data). The batch's rows are split into ``n_microbatches`` equal microbatches; the gradients left
    in the stages' parameters are those of ``sum of token cross-entropies / num_loss_tokens`` over the
    whole batch. The optimizer step and zeroing the gradients are the caller's.

    Args:
        pipeline: From :func:`build_pipeline_schedule`.
        input_ids: ``[B, T]`` token ids.
        positions: ``[B, T]`` positions restarting at 0 for every packed sample.
        labels: ``[B, T]`` unshifted labels, :data:`IGNORE_INDEX` where no loss.
        num_loss_tokens: The step's loss-token total (default: this batch's); with data parallelism
            averaging gradients over ``D`` ranks pass the total over all ranks divided by ``D``.
        rope_seq_lens: Dynamic NTK RoPE only: each token's sequence length ``[B, T]``. Without it
            each microbatch takes its longest position, as a whole-batch forward would take the
            batch's: pass it when positions may pass the trained context.
        broadcast_loss: Send the loss from the last stage to every pipeline rank (a broadcast over
            the pp group); otherwise ranks without the last stage return zero.
        sequence_positions: Stages built with an ``sp_mesh`` only (then required, as is
            ``num_loss_tokens``): the whole rows' positions ``[B, T * sp]``; ``input_ids``,
            ``positions`` and ``labels`` are then this rank's slices, ``labels`` of the next-token
            targets made on the whole rows (:func:`~lmstack.core.parallel.next_token_targets`).
        loss_targets: What the pipeline's ``loss_fn`` gets for each microbatch instead of its
            ``labels`` (split along the rows as they are): a loss other than the token cross-entropy
            passes what it needs, e.g. each row's index into data the caller keeps.

    Returns:
        The batch's loss (detached, a 0-d float32 tensor on the pipeline's device).

    Raises:
        ConfigError: Shapes that disagree or rows that do not split into the microbatches.
        LMStackError: No token carries loss and no ``num_loss_tokens`` was given.
    """
    import torch.distributed as dist

    if input_ids.dim() != 2 or positions.shape != input_ids.shape or labels.shape != input_ids.shape:
        raise ConfigError(
            f"pipeline_step needs input_ids, positions and labels of one [batch, tokens] shape; got "
            f"{tuple(input_ids.shape)}, {tuple(positions.shape)}, {tuple(labels.shape)}."
        )
    rows, n = input_ids.shape[0], pipeline.n_microbatches
    if rows % n:
        raise ConfigError(
            f"pipeline_step splits the batch's {rows} rows into {n} microbatches of equal size; use a "
            f"batch size that is a multiple of n_microbatches (the shapes that travel between stages "
            f"are fixed per schedule)."
        )
    sequence = pipeline.modules[0].sp_mesh is not None
    if sequence and (sequence_positions is None or num_loss_tokens is None):
        raise ConfigError(
            "sequence-parallel pipeline stages need sequence_positions (the whole rows' positions) and "
            "num_loss_tokens (the step's total: a rank holds a slice of the targets)."
        )
    if num_loss_tokens is None:
        num_loss_tokens = float((labels[:, 1:] != IGNORE_INDEX).sum())
        if num_loss_tokens == 0:
            raise LMStackError("pipeline_step: no token of the batch carries loss (every label is -100).")
    elif num_loss_tokens <= 0:
        raise LMStackError(f"pipeline_step: num_loss_tokens must be positive, got {num_loss_tokens}.")
    shape = tuple(input_ids.shape)
    if pipeline._shape is not None and pipeline._shape != shape:
        # The stages' receive buffers were sized for the old shape: start from fresh stages.
        logger.info("pipeline: batch shape %s -> %s, rebuilding the schedule", pipeline._shape, shape)
        pipeline._build()
    pipeline._shape = shape
    kwargs: dict[str, Tensor] = {"positions": positions, "labels": labels}
    if rope_seq_lens is not None:
        kwargs["rope_seq_lens"] = rope_seq_lens
    if sequence:
        assert sequence_positions is not None
        kwargs["sequence_positions"] = sequence_positions
    args = (input_ids,) if pipeline.has_first_stage else ()
    losses: list[Tensor] = []
    pipeline.schedule.step(
        *args,
        target=(labels if loss_targets is None else loss_targets) if pipeline.has_last_stage else None,
        losses=losses if pipeline.has_last_stage else None,
        return_outputs=False,
        loss_kwargs={"num_loss_tokens": float(num_loss_tokens), **({"shifted": True} if sequence else {})},
        **kwargs,
    )
    loss = torch.zeros((), dtype=torch.float32, device=pipeline.device)
    if losses:
        # A loss over vocabulary-sharded logits (tensor parallelism) is a replicated DTensor.
        values = [x.full_tensor() if isinstance(x, DTensor) else x for x in losses]
        loss = torch.stack([x.detach().float() for x in values]).sum().to(pipeline.device)
    if broadcast_loss and pipeline.pp_mesh.size() > 1:
        # The last stage sits on the last pp rank in torch's loop order.
        dist.broadcast(loss, group=pipeline.pp_mesh.get_group(), group_src=pipeline.pp_mesh.size() - 1)
    return loss
