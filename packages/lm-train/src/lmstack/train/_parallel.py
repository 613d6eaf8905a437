"""Training over a 5-D device mesh: tensor, sequence and pipeline parallelism beside FSDP2.

The loop (:mod:`lmstack.train._loop`) hands a model and the recipe's ``parallel:`` section
(:class:`~lmstack.train._parallel_config.ParallelConfig`) to :class:`MeshModel`, which applies
lmstack-core's parallel plans in torchtitan's order:

1. tensor parallelism over ``tp`` (DTensor ``parallelize_module``: heads, feed-forward width and
   vocabulary split; the norms sequence-sharded; the loss computed on vocabulary shards);
2. pipeline stages over ``pp`` (``torch.distributed.pipelining``; each rank keeps its layers under
   their original names);
3. FSDP2 over ``dp_shard x sp`` (sequence-parallel ranks compute gradients of the same weights on
   different tokens, so they shard and reduce like data-parallel ranks), HSDP across ``dp_replicate``.

Each step's micro-batches are read by the ``dp`` coordinate (every tp, sp and pp rank of a data-parallel
rank reads the same bins); sequence parallelism then gives each ``sp`` rank a slice of every bin's
tokens, with next-token targets made on the whole bin first. Gradients are normalised as in one process:
every rank's loss is its token cross-entropy sum times ``dp x sp / step loss tokens``, and FSDP2's
gradient average over those ranks undoes the factor.

The preference objectives (DPO, ORPO, SimPO, KTO, reward models) run on the same mesh (``pp`` for
DPO, ORPO and SimPO: each bin is a pipeline microbatch, whose pairs' loss the last stage computes from
that bin's logits): under ``tp`` their completion tokens' logits are gathered whole (they need each sequence's
log-prob sum, not a cross-entropy over vocabulary shards; a reward model's body is sharded and its
scalar head kept whole); under ``sp`` a scorer gives every sp rank the whole sequences' log-prob sums
(or rewards) from its slice of the tokens, so every sp rank computes the same loss. LoRA adapters train
on every layout: FSDP2 shards the frozen base with them, tensor parallelism splits each adapter as its
projection is, and the final model is rebuilt from a meta-device copy of the adapted model taken
before sharding.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core import CausalLM, ConfigError
from lmstack.core.parallel import ParallelMesh, SequenceLayout, check_tensor_parallel
from lmstack.train._dist import DistInfo
from lmstack.train._objectives import LanguageModeling, MetricSums, Objective
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train.data import IGNORE_INDEX
from lmstack.train.data._errors import TrainConfigError

__all__ = ["MeshModel"]

logger = logging.getLogger(__name__)


class MeshModel:
    """A model spread over a :class:`~lmstack.core.parallel.ParallelMesh`, as the loop drives it.

    Args:
        model: The model (on this rank's device); parallelised in place.
        config: The recipe's ``parallel:`` section (not the default: that is plain data parallelism).
        info: This process's place in the run.
        objective: What the steps minimise.
        activation_checkpointing: Recompute activations in backward.
        mixed_precision: FSDP2 mixed precision (``run.precision: bfloat16-mp``): bf16 weights gathered
            and computed with, gradients reduced in fp32 into fp32 shards; the layout must shard.
        before_split: Called once the layout is checked and before the model is changed (the loop
            scores a pipeline run's reference log-probs there, with the whole model).
        compile: ``torch.compile`` each decoder layer this rank holds but the model's last (as
            ``run.compile`` does in one process), before FSDP2 wraps them; not with ``tp``.

    Raises:
        TrainConfigError: The layout does not fit the world size or the model, KTO or a reward model
            (or a preference objective with sp or a live reference) meets pipeline parallelism, a LoRA
            output head meets tensor
            parallelism, or a 4-bit (QLoRA) base meets any layout.
    """

    def __init__(
        self,
        model: CausalLM,
        config: ParallelConfig,
        info: DistInfo,
        objective: Objective,
        *,
        activation_checkpointing: bool = False,
        mixed_precision: bool = False,
        before_split: Callable[[], None] | None = None,
        compile: bool = False,
    ) -> None:
        config.check()
        _check_objective(objective, model, config.dims)
        _check_adapters(model, config.dims)
        if compile and config.tp > 1:
            raise TrainConfigError(
                "run.compile does not combine with parallel.tp here (inductor fails on the "
                "tensor-parallel DTensor layers); turn one of them off. It does combine with dp_shard, "
                "dp_replicate, sp and pp.",
                field="run.compile",
            )
        if config.tp > 1:  # before the mesh: the widths decide which degrees can work at all
            try:
                check_tensor_parallel(model.config, config.tp)
            except ConfigError as exc:
                raise TrainConfigError(
                    f"{exc} Set parallel.tp to one of them and give the other ranks to dp_shard or "
                    "dp_replicate.",
                    field="parallel.tp",
                ) from exc
        # The model's structure (adapters included) with its parameters on the meta device, taken before
        # any sharding: whole_model() fills it from the shards.
        self._skeleton = _meta_copy(model)
        try:
            self.mesh: ParallelMesh = config.dims.build_mesh(info.device.type)
        except Exception as exc:
            raise TrainConfigError(str(exc), field="parallel") from exc
        dims = self.mesh.dims
        self.config, self.info, self.model = config, info, model
        self.lm = isinstance(objective, LanguageModeling)
        if dims.tp > 1 and isinstance(objective, LanguageModeling) and objective.fused:
            # The fused head multiplies whole weights; under tensor parallelism the vocabulary-sharded
            # logits with torch's loss_parallel do the same job without gathering them.
            objective.fused = False
        # Language modelling keeps the logits sharded on the vocabulary into its loss; the preference
        # objectives gather the logits of their completion tokens (a small share of a bin's tokens).
        self.loss_parallel = dims.tp > 1 and self.lm
        from lmstack.core.parallel import apply_fsdp, apply_tensor_parallel, pipeline_split

        if before_split is not None:
            before_split()
        if dims.tp > 1:
            apply_tensor_parallel(
                model,  # a reward model's body only (its scalar head stays whole)
                self.mesh["tp"],
                sequence_parallel=config.sequence_parallel,
                loss_parallel=self.loss_parallel,
            )
        self.parts: list[nn.Module] = [model]
        if dims.pp > 1:
            # Each rank keeps its stages (the layers under their whole-model names); the rest of the
            # model is dropped with the reference to it.
            self.parts = list(
                pipeline_split(
                    model,
                    self.mesh["pp"],
                    stages_per_rank=config.pp_stages_per_rank,
                    sp_mesh=self.mesh["sp"] if dims.sp > 1 else None,
                    sp_attention=config.sp_attention,
                )
            )
            _drop_unowned(model, self.parts)
        if activation_checkpointing:
            for part in self.parts:
                part.enable_activation_checkpointing()  # type: ignore[operator]
        if compile:
            # Regional: each decoder layer this rank holds but the model's last, before FSDP2 wraps it.
            last = model.model.layers[-1]
            for part in self.parts:
                for layer in part.model.layers:  # type: ignore[union-attr]
                    if layer is not last and not isinstance(layer, nn.Identity):
                        layer.compile()
        self._pipeline: Any = None
        self.sharded = self.mesh.size("dp_shard_sp") * dims.dp_replicate > 1
        if mixed_precision and not self.sharded:
            raise TrainConfigError(
                f"run.precision: bfloat16-mp is FSDP2's mixed precision, and the layout {dims.describe()} "
                "shards nothing (dp_replicate x dp_shard x sp is 1); give ranks to dp_shard, or use "
                "run.precision: bfloat16 (autocast).",
                field="run.precision",
            )
        if self.sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            fsdp_mesh = self.mesh.fsdp_mesh()
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for part in self.parts:
                apply_fsdp(part, fsdp_mesh, mp_policy=policy if mixed_precision else None)  # type: ignore[arg-type]
        #: What the objective's forward runs through: the model, or under sequence parallelism a
        #: scorer that runs each rank on its slice of the tokens (see _SequenceShardedScorer).
        self.scorer: nn.Module = model if dims.sp == 1 else _SequenceShardedScorer(model, self)
        self._preference_loss = _PipelinePreferenceLoss(self)
        logger.info("training on the mesh %s (%s)", dims.describe(), info.device.type)

    # -- layout ---------------------------------------------------------------------------------------

    @property
    def data_rank(self) -> int:
        """Which batches this rank reads."""
        return self.mesh.dp_rank

    @property
    def data_size(self) -> int:
        """How many different batches a step reads."""
        return self.mesh.dp_size

    @property
    def loss_factor(self) -> int:
        """Ranks whose gradients FSDP2 averages (``dp x sp``): each rank's loss is scaled by it."""
        return self.mesh.size("dp_sp")

    @property
    def duplicates(self) -> int:
        """Ranks holding the same step totals (``tp x sp x pp``): a world sum divides by it."""
        dims = self.mesh.dims
        return dims.tp * dims.sp * dims.pp

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (all parts), each once."""
        seen: set[int] = set()
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    # -- the step -------------------------------------------------------------------------------------

    def _set_gradient_sync(self, enabled: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(enabled)

    def _loss_context(self) -> contextlib.AbstractContextManager[Any]:
        if not self.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def micro_step(
        self,
        objective: Objective,
        batch: Any,
        totals: dict[str, float],
        *,
        last: bool,
        autocast: bool,
    ) -> tuple[Tensor, MetricSums]:
        """Forward and backward of one micro-batch (not under pipeline parallelism).

        Returns:
            The loss this rank added (already scaled by :attr:`loss_factor` / the step's total) and the
            objective's metric sums.
        """
        self._set_gradient_sync(last)
        device = self.info.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), self._loss_context():
            sums: MetricSums = {}
            if self.lm and isinstance(self.scorer, _SequenceShardedScorer):
                loss = self.scorer.token_loss(batch) * (self.loss_factor / totals["loss_tokens"])
            else:
                loss, sums = objective.loss(self.scorer, batch, totals, self.loss_factor)
            loss.backward()
        value = loss.detach()
        if not self.lm and self.mesh.dims.sp > 1:
            # Every sp rank computed the whole loss from the reduced log-probs: the loop's world sum
            # should count it once per data-parallel rank, as it counts a language-modelling slice.
            sp = self.mesh.dims.sp
            value = value / sp
            sums = {name: v / sp for name, v in sums.items()}
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):  # the loss over vocabulary-sharded logits: the same on every tp rank
            value = value.full_tensor()
        return value, sums

    @property
    def pipelined(self) -> bool:
        """Whether the decoder layers are cut into pipeline stages."""
        return self.mesh.dims.pp > 1

    def pipeline_step(
        self, window: Sequence[Any], totals: dict[str, float], *, autocast: bool, objective: Objective
    ) -> tuple[Tensor, MetricSums]:
        """Forward and backward of a whole step's micro-batches through the pipeline schedule.

        The step's bins are one pipeline batch with one bin per pipeline microbatch (at least ``pp``
        of them for 1F1B: raise ``run.batch_size`` or ``run.grad_accum`` otherwise). A preference
        objective's loss is computed per bin on the last stage (pairs never cross bins).

        Returns:
            The loss this rank added (0 outside the last stage), scaled as in :meth:`micro_step`, and
            the objective's metric sums (zeros outside the last stage).
        """
        from lmstack.core.parallel import build_pipeline_schedule, pipeline_step
        from lmstack.train.data._preference_packing import PreferenceBatch, preference_rows

        ids = torch.cat([b.input_ids for b in window])
        positions = torch.cat([b.position_ids for b in window])
        labels = torch.cat([b.labels for b in window])
        rows = ids.shape[0]
        loss_targets: Tensor | None = None
        if not self.lm:
            if not all(isinstance(b, PreferenceBatch) for b in window):
                raise TrainConfigError(
                    "parallel.pp runs each packed bin as a microbatch, and these preference batches are "
                    "padded; set data.pack: true.",
                    field="parallel.pp",
                )
            self._preference_loss.start(objective, [r for b in window for r in preference_rows(b)], totals)
            loss_targets = torch.arange(rows, device=ids.device).unsqueeze(1)  # each row's index
        whole_positions: Tensor | None = None
        if self.mesh.dims.sp > 1:
            # Each sp rank runs the stages on its slice of every bin; the targets are made on whole
            # bins first, and the stages read the samples' bounds from the whole bins' positions.
            from lmstack.core.parallel import next_token_targets, shard_sequence

            sp, rank = self.mesh.dims.sp, self.mesh.local_rank("sp")
            kind: SequenceLayout = "zigzag" if self.config.sp_attention == "ring" else "contiguous"
            whole_positions = positions
            ids, positions, labels = (
                shard_sequence(t, rank, sp, dim=1, layout=kind)
                for t in (ids, positions, next_token_targets(labels))
            )
        if self._pipeline is None or self._pipeline.n_microbatches != rows:
            try:
                self._pipeline = build_pipeline_schedule(
                    self.parts,  # type: ignore[arg-type]
                    n_microbatches=rows,
                    schedule=self.config.pp_schedule,
                    device=self.info.device,
                    **({} if self.lm else {"loss_fn": self._preference_loss}),
                )
            except Exception as exc:
                raise TrainConfigError(
                    f"{exc} (a step's bins, run.batch_size x run.grad_accum = {rows}, are the pipeline's "
                    "microbatches)",
                    field="parallel.pp",
                ) from exc
        with (
            torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=autocast),
            self._loss_context(),
        ):
            loss = pipeline_step(
                self._pipeline,
                ids,
                positions,
                labels,
                num_loss_tokens=totals["loss_tokens"] / self.loss_factor if self.lm else 1.0,
                broadcast_loss=False,
                sequence_positions=whole_positions,
                loss_targets=loss_targets,
            )
        return loss, {} if self.lm else self._preference_loss.sums(objective, loss.device)

    def whole_model(self, scratch: Path) -> CausalLM | None:
        """The trained model with whole weights on rank 0's CPU (None elsewhere); a collective.

        Every rank writes its shards to ``scratch`` as a distributed checkpoint, which rank 0 reads
        back into a plain model: no rank ever gathers the weights of stages it does not hold.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        main = self.info.is_main
        if main and scratch.exists():
            shutil.rmtree(scratch)
        dist.barrier()
        state: dict[str, Any] = {}
        for part in self.parts:
            state.update(get_model_state_dict(part))
        names = {name for part in self.parts for name, _ in part.named_parameters()}
        dcp.save({k: v for k, v in state.items() if k in names}, checkpoint_id=scratch)
        dist.barrier()
        if not main:
            return None
        plain = cast(CausalLM, self._skeleton.to_empty(device="cpu"))
        wanted = dict(plain.named_parameters())  # a tied head once, under the embedding's name
        dcp.load(wanted, checkpoint_id=scratch, no_dist=True)
        if isinstance(plain, CausalLM):
            plain.tie_weights()
        shutil.rmtree(scratch, ignore_errors=True)
        return plain.eval()

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the gradients of every part to ``max_norm`` together; returns the norm before clipping.

        Gradients are normed in groups of one kind, since torch's fused kernels take one at a time: whole
        tensors, and DTensors by their device mesh (a norm weight that tensor parallelism without
        sequence parallelism leaves replicated is whole, or under FSDP2 sharded on the data-parallel mesh
        alone, beside the 2-D shards of the tensor-parallel weights); the squares are added, and
        pipeline stages add theirs over the ``pp`` group.
        """
        from torch.distributed.tensor import DTensor

        params = [p for p in self.parameters() if p.grad is not None]
        by_mesh: dict[Any, list[nn.Parameter]] = {}
        for p in params:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
        groups = list(by_mesh.values())
        squared = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for group in groups:
            if group:
                norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)  # type: ignore[misc]
                if isinstance(norm, DTensor):  # reduced over the gradients' mesh
                    norm = norm.full_tensor()
                squared += norm.double() ** 2
        if self.mesh.dims.pp > 1:  # each stage holds different parameters: their squares add up
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
        total = squared.sqrt().float()
        for group in groups:
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
        return float(total)


def _check_adapters(model: nn.Module, dims: Any) -> None:
    """Refuse adapter runs the mesh does not train: a 4-bit base anywhere, a LoRA head under tp."""
    if not any(not p.requires_grad for p in model.parameters()):
        return
    if any("4bit" in type(m).__name__ for m in model.modules()):
        raise TrainConfigError(
            "a QLoRA base is stored in bitsandbytes' packed 4-bit format, which a parallel: layout "
            "cannot shard; train QLoRA with run.data_parallel: ddp and no parallel: section, or LoRA "
            "on the full-precision base with parallel: dp_shard.",
            field="parallel",
        )
    lm_head = getattr(model, "lm_head", None)
    if dims.tp > 1 and lm_head is not None and type(lm_head) is not nn.Linear:
        raise TrainConfigError(
            "parallel.tp splits the output head over the vocabulary, and lora.target_modules adapts it; "
            "leave lm_head out of the targets, or drop parallel.tp.",
            field="parallel.tp",
        )


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (buffers are copied as they are)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def _check_objective(objective: Objective, model: nn.Module, dims: Any) -> None:
    """Refuse objective and layout pairs the mesh does not train (yet), naming what does."""
    from lmstack.train._reward import RewardModel

    if not isinstance(model, (CausalLM, RewardModel)):
        raise TrainConfigError(
            f"a parallel: layout trains causal language models and reward models; the {objective.name} "
            f"recipe's {type(model).__name__} runs data parallel: drop the parallel: section and use "
            "run.data_parallel ddp or fsdp.",
            field="parallel",
        )
    if not isinstance(objective, LanguageModeling) and dims.pp > 1:
        from lmstack.train._objectives import PairwisePreference

        pairwise = isinstance(objective, PairwisePreference) and objective.method != "rm"
        if not pairwise or dims.sp > 1 or objective.reference_mode == "adapter_off":
            raise TrainConfigError(
                f"parallel.pp trains DPO, ORPO and SimPO (each bin a microbatch, its pairs' loss on the "
                f"last stage), without sp and with a precomputed reference; the {objective.name} recipe "
                "here takes dp_replicate, dp_shard, tp and sp: drop parallel.pp.",
                field="parallel.pp",
            )


class _GivenLogits(nn.Module):
    """A stand-in for the model whose forward the pipeline's last stage already ran: its logits."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def sequence_logps(self, batch: Any, layout: Any, *, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """The sequences' log-prob sums from the logits of the batch's loss positions."""
        from lmstack.train._objectives import logps_from_logits

        return logps_from_logits(self.logits, batch, layout, chunk_size=chunk_size)


class _PipelinePreferenceLoss:
    """The pipeline's ``loss_fn`` for a pairwise preference objective: one bin's loss on the last stage.

    Each microbatch's target is its row's index; the objective computes that bin's pairs' loss from the
    last stage's logits (its completion tokens') and the bin's own batch, and the metric sums add up.
    torch's schedule also calls the loss once on placeholder outputs in its first step (to infer the
    gradients' shapes), before the real call for that row: each row keeps its last call's sums.
    """

    def __init__(self, mesh_model: MeshModel) -> None:
        self.mesh_model = mesh_model
        self.objective: Objective | None = None
        self.rows: list[Any] = []
        self.totals: dict[str, float] = {}
        self.row_sums: dict[int, MetricSums] = {}

    def start(self, objective: Objective, rows: list[Any], totals: dict[str, float]) -> None:
        """Set up a step: its objective, its bins as one batch each, and its totals."""
        self.objective, self.rows, self.totals, self.row_sums = objective, rows, totals, {}

    def __call__(self, output: Tensor, target: Tensor, **_: Any) -> Tensor:
        assert self.objective is not None
        index = int(target.reshape(-1)[0])
        row = self.rows[index].to(output.device)
        loss, self.row_sums[index] = self.objective.loss(
            _GivenLogits(output), row, self.totals, self.mesh_model.loss_factor
        )
        return loss

    def sums(self, objective: Objective, device: torch.device) -> MetricSums:
        """The step's metric sums, with zeros on ranks without the last stage (the loop reduces them)."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return {
            name: sum((sums[name] for sums in self.row_sums.values()), zero)
            for name in objective.denominators
        }


class _SequenceShardedScorer(nn.Module):
    """The model as an objective sees it under sequence parallelism.

    Each sp rank runs the forward on its slice of every bin's tokens. For language modelling the loss
    is each rank's own tokens' cross-entropy. The preference objectives find :meth:`sequence_logps`
    (:func:`~lmstack.train._objectives.sequence_logps`) and :meth:`sequence_rewards` here: each rank sums
    its tokens' log-probs (or scores the sequences whose last token it holds) per sequence, and the
    partial sums are added up over the sp group. The sum's gradient is passed back to each rank
    unchanged (every rank holds the same loss of the whole sums), so each rank's backward gives its own
    tokens' share and FSDP2's reduction over ``dp_shard x sp`` adds the shares.
    """

    def __init__(self, model: nn.Module, mesh_model: MeshModel) -> None:
        super().__init__()
        self.model = model
        self._mesh = mesh_model.mesh
        self._attention = mesh_model.config.sp_attention

    def _slices(self, batch: Any, *per_token: Tensor) -> tuple[Tensor, Tensor, list[Tensor], Any]:
        """This rank's slice of the ids, positions and each ``[B, T]`` tensor, and the attention."""
        from lmstack.core.parallel import RingAttention, UlyssesAttention, shard_sequence

        if getattr(batch, "cu_seqlens", None) is None:
            raise TrainConfigError(
                "parallel.sp splits packed sequences, and this batch is padded; set data.pack: true, or "
                "drop parallel.sp.",
                field="parallel.sp",
            )
        sp, rank = self._mesh.dims.sp, self._mesh.local_rank("sp")
        kind: SequenceLayout = "zigzag" if self._attention == "ring" else "contiguous"
        ids, positions, *rest = (
            shard_sequence(t, rank, sp, dim=1, layout=kind)
            for t in (batch.input_ids, batch.position_ids, *per_token)
        )
        backend = RingAttention if self._attention == "ring" else UlyssesAttention
        return ids, positions, rest, backend(batch.cu_seqlens, self._mesh["sp"], layout=kind)

    def _summed(self, partial: Tensor) -> Tensor:
        """``partial`` added up over the sp group: the sum forward, this rank's own gradient backward."""
        whole = partial.detach().clone()
        dist.all_reduce(whole, group=self._mesh["sp"].get_group())
        return partial + (whole - partial.detach())

    def token_loss(self, batch: Any) -> Tensor:
        """The summed token cross-entropy of this rank's slice of every bin (language modelling)."""
        from lmstack.core.parallel import next_token_targets

        # Shifted on the whole bin, so the targets across a slice edge are kept.
        ids, positions, (targets,), attn = self._slices(batch, next_token_targets(batch.labels))
        flat = targets.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().flatten()
        logits = self.model(ids, positions, attn, logits_indices=rows)
        return F.cross_entropy(logits.float(), flat[rows], reduction="sum")

    def sequence_logps(self, batch: Any, layout: Any, *, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """``(logps [S], tokens [S])`` of every sequence of a packed preference or KTO batch."""
        from lmstack.core.parallel import next_token_targets
        from lmstack.train._preference_losses import token_logps

        # The segment each target belongs to: that of the next position (labels are -100 on every
        # sequence's first token, so a target never crosses a boundary).
        segments = layout.segment_ids.reshape(batch.labels.shape)
        next_segments = torch.cat([segments[:, 1:], segments[:, -1:]], dim=1)
        ids, positions, (targets, local_segments), attn = self._slices(
            batch, next_token_targets(batch.labels), next_segments
        )
        flat = targets.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().flatten()
        logits = self.model(ids, positions, attn, logits_indices=rows)
        logp = token_logps(logits, flat[rows], chunk_size=chunk_size)
        segment = local_segments.reshape(-1)[rows]
        sums = torch.zeros(layout.num_segments, dtype=torch.float32, device=logp.device)
        counts = torch.zeros(layout.num_segments, dtype=torch.int64, device=logp.device)
        counts = counts.index_add(0, segment, torch.ones_like(segment))
        dist.all_reduce(counts, group=self._mesh["sp"].get_group())
        return self._summed(sums.index_add(0, segment, logp)), counts

    def sequence_rewards(self, batch: Any, layout: Any) -> Tensor:
        """``[S]`` a reward model's reward of every sequence of a packed batch, read at its last token.

        The rank holding a sequence's last token scores it; the rewards are added over the sp group.
        """
        # Each token's sequence where it is a sequence's last token, -1 elsewhere.
        last = torch.full((batch.input_ids.numel(),), -1, dtype=torch.long, device=batch.input_ids.device)
        last[layout.last_token] = torch.arange(layout.num_segments, device=last.device)
        ids, positions, (local_last,), attn = self._slices(batch, last.reshape(batch.input_ids.shape))
        flat = local_last.reshape(-1)
        rows = (flat >= 0).nonzero().flatten()
        scores = self.model(ids, positions, attn, indices=rows)
        rewards = torch.zeros(layout.num_segments, dtype=torch.float32, device=scores.device)
        return self._summed(rewards.index_add(0, flat[rows], scores.float()))


def _drop_unowned(model: CausalLM, parts: list[nn.Module]) -> None:
    """Free what other pipeline ranks hold from ``model`` (the loop keeps it for its config).

    The stages share their modules with ``model``; replacing the layers, embedding and head no stage of
    this rank owns by parameter-less stand-ins lets their weights go, so a rank holds its stages only.
    """
    owned = {id(m) for part in parts for m in part.modules()}
    layers = model.model.layers
    for i in range(len(layers)):
        if id(layers[i]) not in owned:
            layers[i] = nn.Identity()
    if id(model.model.embed_tokens) not in owned:
        model.model.embed_tokens = nn.Identity()  # type: ignore[assignment]
    if id(model.lm_head) not in owned:
        model.lm_head = nn.Identity()  # type: ignore[assignment]
    if id(model.model.norm) not in owned:
        model.model.norm = nn.Identity()  # type: ignore[assignment]
