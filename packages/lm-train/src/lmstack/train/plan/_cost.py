r"""The cost model: memory per device and step time of one layout, from the model's shapes alone.

Notation: ``C`` hidden size, ``F`` feed-forward width, ``L`` layers, ``Hq``/``Hkv`` query and key/value
heads of width ``D`` (``Cq = Hq·D``, ``Ckv = Hkv·D``), ``V`` vocabulary, ``T`` sequence length, ``B``
global batch (sequences per optimizer step), ``b`` micro-batch (sequences per data-parallel rank per
forward), ``m = B / (dp·b)`` micro-batches per step. A layout has degrees
``dp_replicate x dp_shard x tp x sp x pp`` (see :class:`lmstack.core.parallel.ParallelDims`); FSDP
shards over ``S = dp_shard·sp`` ranks, tensor parallelism splits each layer over ``tp``, sequence
parallelism (Ulysses) gives each rank ``T/sp`` tokens of every sequence, and a pipeline rank holds
``L/pp`` layers (the embedding on the first, the final norm and the head on the last).

Precision sets three widths: ``s`` of what the projections, attention and the SwiGLU output, ``s_r``
of the residual stream and the norms, ``s_w`` of a weight as FSDP gathers it. ``fp32``: 4, 4, 4.
``bf16`` (lmstack's ``run.precision: bfloat16``: autocast over fp32 weights): 2, 4, 4. ``bf16-mp``
(FSDP2 mixed precision, bf16 weights for compute): 2, 2, 2.

**Parameters.** Per layer ``C·Cq + 2·C·Ckv + Cq·C + 3·C·F + 2·C`` (plus biases), embedding ``V·C``,
head ``V·C`` unless tied, final norm ``C``: 6,738,415,616 for Llama-2-7B. ``P`` below is what one rank
holds before FSDP sharding: its layers, embedding and head, divided by ``tp``.

**Model state** (bytes per device). Master weights ``4·P/S`` (fp32 in every precision), AdamW's two
moments ``8·P/S``. Gradients are fp32: sharded, ``4·P/S``, when every micro-batch reduce-scatters;
whole, ``4·P``, when gradients accumulate over micro-batches without communication, as lmstack's loop
and torch's pipeline schedules do (FSDP2 keeps each unit's unsharded gradient until the last
micro-batch) and whenever nothing is sharded (``S = 1``).

**Activations** saved for backward, per local token of a layer, as lmstack's decoder layer saves
them. Each RMSNorm keeps its fp32 input (or fp32 copy), its normalised output and ``rsqrt``; the
projections keep their input (the norm's output, or under autocast one bf16 cast per projection:
``n_a = 3`` after the first norm, ``n_m = 2`` after the second, else 1); attention keeps q, k, v, its
output and the fp32 log-sum-exp; SwiGLU keeps gate, up, ``silu(gate)`` and their product; under
autocast each layer also keeps bf16 casts of RoPE's cos and sin for q and for k::

    a = 2·(4C + s_r·C + 4)/tp' + (n_a + n_m)·s·C + [s·(2Cq + 2Ckv) + 4·Hq]/tp + 4·s·F/tp (+ 8·D·2)

where ``tp' = tp`` (tensor parallelism keeps the norms' region sharded on the sequence; the linear
inputs are all-gathered whole) and there are ``b·T/sp`` local tokens. With activation checkpointing
a layer keeps only its input, ``s_r·C/tp'``, and its backward recomputes one layer's full ``a`` at a
time. Outside the layers: token ids (8 bytes), RoPE's shared cos/sin (``2·D·s_r``), the final norm
(``4C + s_r·C + 4``), and the loss: lmstack's fused head + cross-entropy (data parallelism only) stores
``d hidden`` (``s_r·C`` per token) and ``d W`` (``V·C`` in the weight's dtype) and holds one chunk of
fp32 logits (64 MiB at most) with its temporaries while it runs; the plain loss of lmstack's mesh
path (any ``tp``, ``sp`` or ``pp``; vocabulary-parallel under ``tp``) keeps the fp32 log-softmax,
``4·V/tp`` per token, and holds the logits and their fp32 copy, ``(s + 4)·V/tp``, during its forward
and about twice that in backward. A pipeline rank holds
the activations of the micro-batches in flight: ``min(m, pp)`` on the first rank under 1F1B,
``(v-1)·pp + 2·(pp-1) + 1`` chunks of ``L/(pp·v)`` layers under interleaved 1F1B with ``v`` stages
per rank (torch's warm-up count), one on the last rank.

**Buffers.** FSDP2 keeps the root unit (embedding, final norm, head) unsharded from forward to
backward (``s_w·(V·C·(1 or 2) + C)/tp``) and the flat output of its latest all-gather until the next
one (one layer's weights, ``s_w·P_layer``, even while the loss runs); in backward two layers are
unsharded (the one computing, the one prefetched, and the latter's all-gather output), and at the end
of a layer's backward its unsharded gradient and the fp32 reduce-scatter input. Under autocast the
bf16 copy of every projection weight is saved for its backward: ``2·N_layers/tp`` bytes held from
forward to backward, *not sharded by FSDP* (one layer's with checkpointing, except on the mesh path,
whose autocast region, and so its cache of casts, spans the backward). DDP's gradient buckets
are a second fp32 copy of the gradients. The backward of a layer holds the gradients of the
SwiGLU's two ``F``-wide intermediates and of the residual stream, ``2·s·F/tp + s_r·C`` per token. The
optimizer step (AdamW's foreach path) allocates one more fp32 state-sized temporary, ``4·P/S``.

**Peak.** Gradients appear in backward as activations are freed, so the peak is the largest of
three moments rather than the sum of everything: the end of the forward (state + activations +
forward buffers + the loss's working set), the backward (its two ends: every activation with no new
gradient yet, or the last layer's activations with every new gradient; plus the recomputed layer and
the backward buffers), and the optimizer step (state + gradients + its temporary). Each component of
:class:`MemoryBreakdown` is its value at that moment, so they add up to the peak.

**Time** per optimizer step. Model FLOPs per token ``6·N_mm + 6·L·Cq·T`` (``N_mm``: parameters in
matmuls, the head included and the embedding not; causal attention at half the ``T²`` work, as
flash kernels skip masked blocks); checkpointing adds a forward of the layers (``2·N_layers +
2·L·Cq·T``). Compute ``= FLOPs / (devices · peak · compute_efficiency)``; with a pipeline the slowest
rank sets the pace: the last one also runs the output head (``6·V·C`` FLOPs per token). Communication
at ``bandwidth · comm_efficiency``, over the node's links when the group fits in a node, else over
the network:

* TP: per layer and micro-batch, two all-gathers and two reduce-scatters of ``b·(T/sp)·C·s`` bytes
  in forward, as many in backward (and again in recompute), each moving ``(tp-1)/tp`` of it;
  on the critical path.
* SP (Ulysses): per layer and micro-batch, all-to-alls of q, k, v and the output (``(2Cq + 2Ckv)/tp``
  per token, ``(sp-1)/sp`` of it leaves the rank) in forward, backward (and recompute); on the critical
  path.
* FSDP: per micro-batch an all-gather of the rank's weights in forward and again in backward,
  ``(S-1)/S · s_w·P``; a reduce-scatter of fp32 gradients per step (or per micro-batch); HSDP adds an
  all-reduce of the sharded gradients across ``dp_replicate``, ``2(R-1)/R · 4·P/S``. FSDP prefetches
  the next layer while one computes, so what is exposed is each micro-batch's first all-gather in
  forward and in backward, the last reduce-scatter, and whatever the rest exceeds of
  ``overlap x compute`` (the share of compute time communication can run under).
* PP: the bubble, ``(pp-1)/v`` micro-batch times (of the slowest rank) out of ``m + (pp-1)/v``, and
  the point-to-point sends of the fill and drain (``2·b·(T/sp)·C·s_r`` per hop).

Tokens per second per device ``= B·T / step / devices``; MFU divides model FLOPs (no recompute) by
``step · devices · peak``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from lmstack.core import ModelConfig
from lmstack.core.parallel import ParallelDims
from lmstack.train.plan._cluster import Cluster
from lmstack.train.plan._errors import PlanError

__all__ = [
    "Estimate",
    "GradSync",
    "Layout",
    "MemoryBreakdown",
    "ParamCount",
    "Precision",
    "TimeBreakdown",
    "Workload",
    "count_parameters",
    "estimate",
]

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "bf16-mp", "fp32"]
GradSync = Literal["step", "microbatch"]

#: The fp32 logits one chunk of lmstack's fused loss may hold (``lmstack.train._fused_loss``).
FUSED_LOSS_CHUNK_BYTES = 64 << 20


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class Workload:
    """What is trained, independent of the layout.

    Attributes:
        seq_len: Tokens per sequence (a packed bin).
        global_batch: Sequences per optimizer step, over all data-parallel ranks.
        precision: ``bf16``: bf16 compute under autocast over fp32 weights, gradients and AdamW state,
            as lmstack's loop runs ``run.precision: bfloat16``; ``bf16-mp``: FSDP2 mixed precision
            (bf16 weights for compute, gathered and kept in bf16, fp32 gradient reduction; fp32
            master weights and AdamW state), as torchtitan trains and ``run.precision: bfloat16-mp``
            runs; ``fp32``.
        grad_sync: When gradients are reduced: once per ``step`` (micro-batches accumulate unsharded
            gradients without communication, as lmstack's loop does) or every ``microbatch``.
        fused_loss: lmstack's fused output head + cross-entropy where it applies (``tp = 1``).
    """

    seq_len: int
    global_batch: int
    precision: Precision = "bf16"
    grad_sync: GradSync = "step"
    fused_loss: bool = True

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len)
        _positive("global_batch", self.global_batch)
        if self.precision not in ("bf16", "bf16-mp", "fp32"):
            raise PlanError(f"precision must be 'bf16', 'bf16-mp' or 'fp32', got {self.precision!r}.")
        if self.grad_sync not in ("step", "microbatch"):
            raise PlanError(f"grad_sync must be 'step' or 'microbatch', got {self.grad_sync!r}.")

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step."""
        return self.seq_len * self.global_batch


@dataclass(frozen=True)
class Layout:
    """One way to spread a run over the devices.

    Attributes:
        dp_replicate: HSDP replicas (or DDP replicas when nothing is sharded).
        dp_shard: FSDP shards (FSDP shards over ``dp_shard x sp`` ranks).
        tp: Tensor-parallel degree.
        sp: Sequence-parallel (Ulysses) degree.
        pp: Pipeline stages (ranks).
        micro_batch: Sequences per micro-batch on each data-parallel rank.
        activation_checkpointing: Recompute each decoder layer in backward.
        stages_per_rank: Pipeline stages per rank (interleaved 1F1B when above 1).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    sp: int = 1
    pp: int = 1
    micro_batch: int = 1
    activation_checkpointing: bool = False
    stages_per_rank: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "sp", "pp", "micro_batch", "stages_per_rank"):
            _positive(name, getattr(self, name))
        if self.stages_per_rank > 1 and self.pp == 1:
            raise PlanError("stages_per_rank > 1 needs a pipeline (pp > 1).")

    @property
    def world_size(self) -> int:
        """Devices the layout takes."""
        return self.dp_replicate * self.dp_shard * self.tp * self.sp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each reads its own sequences)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks FSDP shards parameters over (``dp_shard x sp``)."""
        return self.dp_shard * self.sp

    def dims(self) -> ParallelDims:
        """The layout's degrees as lmstack-core's :class:`~lmstack.core.parallel.ParallelDims`."""
        return ParallelDims(
            dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp, sp=self.sp, pp=self.pp
        )

    def describe(self) -> str:
        """The degrees above 1, e.g. ``dp_shard=32 tp=8`` (``single device`` when none)."""
        parts = [
            f"{name}={value}"
            for name, value in (
                ("dp_replicate", self.dp_replicate),
                ("dp_shard", self.dp_shard),
                ("tp", self.tp),
                ("sp", self.sp),
                ("pp", self.pp),
            )
            if value > 1
        ]
        if self.stages_per_rank > 1:
            parts.append(f"v={self.stages_per_rank}")
        return " ".join(parts) or "single device"


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model, by where they live.

    Attributes:
        per_layer: One decoder layer's (projections, biases, two norms).
        layer_matmul: One decoder layer's projection weights (what its tokens multiply by).
        embedding: The input embedding's.
        head: The output head's (0 when tied to the embedding).
        final_norm: The final RMSNorm's.
        total: All of them (a tied matrix once).
        matmul_per_token: Parameters each token is multiplied by (layers' projections and the head;
            not the embedding lookup or the norms): the ``N`` of ``6·N`` FLOPs per token.
    """

    per_layer: int
    layer_matmul: int
    embedding: int
    head: int
    final_norm: int
    total: int
    matmul_per_token: int


def count_parameters(config: ModelConfig) -> ParamCount:
    """Count a model's parameters from its config (no model is built).

    Example:
        >>> from lmstack.train.plan import model_preset
        >>> count_parameters(model_preset("llama2-7b")).total
        6738415616
    """
    c, f = config.hidden_size, config.intermediate_size
    assert config.head_dim is not None and config.num_key_value_heads is not None
    cq = config.num_attention_heads * config.head_dim
    ckv = config.num_key_value_heads * config.head_dim
    matmul = c * cq + 2 * c * ckv + cq * c + 3 * c * f
    biases = (cq + 2 * ckv if config.qkv_bias else 0) + (c if config.o_bias else 0)
    biases += 2 * f + c if config.mlp_bias else 0
    per_layer = matmul + biases + 2 * c
    embedding = config.vocab_size * c
    head = 0 if config.tie_word_embeddings else config.vocab_size * c
    total = config.num_hidden_layers * per_layer + embedding + head + c
    return ParamCount(
        per_layer=per_layer,
        layer_matmul=matmul,
        embedding=embedding,
        head=head,
        final_norm=c,
        total=total,
        matmul_per_token=config.num_hidden_layers * matmul + config.vocab_size * c,
    )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device at the peak moment of the most loaded rank; the parts add up to ``peak``.

    Attributes:
        params: Master weights (fp32, sharded by FSDP).
        grads: Gradients held at the peak.
        optimizer: AdamW's moments.
        activations: Tensors saved for backward (and the layer being recomputed) at the peak.
        buffers: Everything transient at the peak: FSDP's unsharded weights and gradients, bf16
            weight copies, the loss's working set, backward's gradient buffers, pipeline receive
            buffers, DDP buckets, the optimizer's temporaries.
        peak: Their sum.
        phase: Where the peak is: ``forward`` (its end), ``backward`` or ``optimizer``.
        rank: Which pipeline rank it is on: ``first``, ``last`` or ``only`` (no pipeline).
        activations_per_token_layer: Bytes saved per local token per decoder layer (the checkpointed
            figure when checkpointing).
        saved_activations: Bytes the rank's micro-batches in flight have saved for backward at the end
            of a forward (the peak or not).
    """

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    peak: float
    phase: str
    rank: str
    activations_per_token_layer: float
    saved_activations: float


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds per optimizer step.

    Attributes:
        compute: Model FLOPs and recompute at the planned efficiency (no bubble).
        tp_comm: Tensor-parallel collectives (exposed).
        sp_comm: Sequence-parallel all-to-alls (exposed).
        fsdp_comm: FSDP all-gathers and reduce-scatters and the HSDP/DDP all-reduce, before overlap.
        fsdp_exposed: What of ``fsdp_comm`` is not hidden behind compute.
        pp_comm: Pipeline point-to-point transfers of the fill and drain (exposed).
        bubble: Pipeline idle time.
        step: The step: compute, exposed communication and bubble.
    """

    compute: float
    tp_comm: float
    sp_comm: float
    fsdp_comm: float
    fsdp_exposed: float
    pp_comm: float
    bubble: float
    step: float

    @property
    def comm_exposed(self) -> float:
        """All exposed communication."""
        return self.tp_comm + self.sp_comm + self.fsdp_exposed + self.pp_comm


@dataclass(frozen=True)
class Estimate:
    """The cost model's prediction for one layout.

    Attributes:
        layout: The layout.
        micro_batches: Micro-batches per step on each data-parallel rank (``m``).
        memory: Memory per device at the peak.
        time: Step time and its parts.
        tokens_per_s_per_device: Training throughput per device.
        mfu: Model FLOPs utilisation (no recompute counted).
        fits: Whether ``memory.peak`` is within the cluster's usable memory.
        notes: Assumptions worth showing (e.g. an interleaved schedule's constraint).
    """

    layout: Layout
    micro_batches: int
    memory: MemoryBreakdown
    time: TimeBreakdown
    tokens_per_s_per_device: float
    mfu: float
    fits: bool
    notes: tuple[str, ...] = field(default=())


def _shape_checks(config: ModelConfig, layout: Layout, workload: Workload) -> int:
    """Validates that ``layout`` can run ``workload`` on ``config``; returns the micro-batch count."""
    assert config.num_key_value_heads is not None
    heads, kv, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    if heads % layout.tp or kv % layout.tp or config.intermediate_size % layout.tp:
        raise PlanError(
            f"tp={layout.tp} must divide the query heads ({heads}), key/value heads ({kv}) and "
            f"intermediate size ({config.intermediate_size})."
        )
    if workload.seq_len % layout.sp:
        raise PlanError(f"sp={layout.sp} must divide the sequence length {workload.seq_len}.")
    if (heads // layout.tp) % layout.sp:
        raise PlanError(
            f"sp={layout.sp} must divide the query heads per tensor-parallel rank ({heads // layout.tp})."
        )
    stages = layout.pp * layout.stages_per_rank
    if layers % stages:
        raise PlanError(f"pp x stages_per_rank = {stages} must divide the {layers} layers.")
    if layout.pp > 1 and config.tie_word_embeddings:
        raise PlanError("a pipeline cannot split a model whose embedding and head are tied.")
    per_rank, rest = divmod(workload.global_batch, layout.dp)
    if rest:
        raise PlanError(
            f"the global batch {workload.global_batch} is not divisible by the {layout.dp} "
            "data-parallel ranks."
        )
    m, rest = divmod(per_rank, layout.micro_batch)
    if rest:
        raise PlanError(
            f"micro_batch={layout.micro_batch} does not divide the {per_rank} sequences per "
            "data-parallel rank."
        )
    if layout.pp > 1 and m < layout.pp:
        raise PlanError(f"a {layout.pp}-stage pipeline needs at least {layout.pp} micro-batches, got {m}.")
    if layout.stages_per_rank > 1:
        rounds = max(1, m // layout.pp)
        if m % rounds:
            raise PlanError(
                f"interleaved 1F1B needs the {m} micro-batches to be a multiple of its {rounds} rounds."
            )
    return m


def _span(layout: Layout, dim: str) -> int:
    """The extent, in consecutive ranks, of a group of ``dim``.

    The mesh order is pp, dp_replicate, dp_shard, sp, tp: the innermost dims are the closest ranks.
    """
    inner = {"tp": 1, "sp": layout.tp, "dp_shard": layout.tp * layout.sp}
    if dim == "fsdp":  # dp_shard x sp: contiguous over sp and dp_shard, stride tp
        return layout.tp * layout.sp * layout.dp_shard
    if dim == "dp_replicate":
        return layout.tp * layout.sp * layout.dp_shard * layout.dp_replicate
    if dim == "pp":
        return layout.world_size
    return inner[dim] * getattr(layout, dim)


def estimate(config: ModelConfig, layout: Layout, workload: Workload, cluster: Cluster) -> Estimate:
    """Predict memory per device and step time of ``layout`` (the formulas are in this module's doc).

    Args:
        config: The model.
        layout: The layout (its world size need not match the cluster's, but bandwidths and node
            boundaries are the cluster's).
        workload: Sequence length, global batch, precision, gradient sync.
        cluster: Devices and links.

    Raises:
        PlanError: The layout cannot run the workload (a degree does not divide what it splits, the
            batch does not divide, too few micro-batches for the pipeline).
    """
    m = _shape_checks(config, layout, workload)
    counts = count_parameters(config)
    assert config.head_dim is not None and config.num_key_value_heads is not None
    c, f, v_size = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, d, hq = config.num_hidden_layers, config.head_dim, config.num_attention_heads
    cq, ckv = hq * d, config.num_key_value_heads * d
    tp, sp, pp, v = layout.tp, layout.sp, layout.pp, layout.stages_per_rank
    shards = layout.fsdp
    precision = workload.precision
    autocast = precision == "bf16"  # bf16 compute under autocast over fp32 weights (lmstack's loop)
    mixed = precision == "bf16-mp"  # FSDP2 mixed precision: bf16 weights and activations
    s = 4 if precision == "fp32" else 2  # what linear layers, attention and the SwiGLU output
    s_res = 2 if mixed else 4  # the residual stream and the norms (fp32 under autocast)
    w_bytes = 2 if mixed else 4  # a weight as FSDP gathers it
    tp_seq = tp  # tensor parallelism keeps the norms' region sequence-sharded (lmstack's default)
    tokens = layout.micro_batch * workload.seq_len // sp  # local tokens of one micro-batch
    ckpt = layout.activation_checkpointing
    # A parallel: layout beyond data parallelism runs on lmstack's mesh path, where the loss is the plain
    # (vocabulary-parallel under tp) cross-entropy and autocast spans the backward too.
    mesh = tp > 1 or sp > 1 or pp > 1 or (layout.dp_replicate > 1 and layout.dp_shard > 1)
    fused = workload.fused_loss and not mesh
    accumulate = (m > 1 or pp > 1) and workload.grad_sync == "step"

    # -- activations per local token ------------------------------------------------------------
    # A norm keeps its fp32 input (or fp32 copy), its normalised output and rsqrt; the projections
    # after it keep their input: the norm's output itself, or under autocast one bf16 cast per
    # projection (q, k, v after the first norm; gate, up after the second).
    casts_attn, casts_mlp = (3, 2) if autocast else (1, 1)
    norm_part = (4 * c + s_res * c + 4) / tp_seq
    attention = (s * (2 * cq + 2 * ckv) + 4 * hq) / tp
    mlp = 4 * s * f / tp
    # RoPE's tables: under autocast each layer casts cos and sin to bf16 for q and for k (and keeps
    # them); otherwise every layer shares the tables the model computed once.
    rope_layer = 4 * d * 2 if autocast else 0
    a_layer = 2 * norm_part + (casts_attn + casts_mlp) * s * c + attention + mlp + rope_layer
    a_kept = s_res * c / tp_seq if ckpt else a_layer
    rope = 2 * d * s_res if (ckpt or not autocast) else 0
    final_norm = (4 * c + s_res * c + 4) / tp_seq
    vc = v_size * c
    loss_saved_tok: float
    loss_saved_const: float
    loss_fwd: float
    if fused:
        loss_saved_tok = s_res * c + 16  # d hidden (the hidden's dtype), loss indices and targets
        loss_saved_const = (2 if mixed else 4) * vc  # d W in the weight's dtype
        rows = min(tokens, max(1, FUSED_LOSS_CHUNK_BYTES // (4 * v_size)))
        # One chunk's fp32 logits (and their bf16 copy), two [rows, C] temporaries (and the bf16
        # hidden under autocast); the bf16 weight, the chunk's bf16 d W and its fp32 cast (autocast),
        # the fp32 accumulator of d W (mixed).
        per_row = 4 * v_size + (2 * v_size if s == 2 else 0) + 2 * s * c + (2 * c if autocast else 0)
        loss_fwd = rows * per_row + (8 * vc if autocast else 10 * vc if mixed else 0)
        loss_bwd = 0.0  # its gradients were computed in forward
    else:
        loss_saved_tok = s * c + 4 * v_size / tp + 16  # head input, fp32 log-softmax
        loss_saved_const = 0.0
        # The logits (and their fp32 copy in bf16); loss_parallel's log-softmax also holds the shifted
        # logits. In backward: the gradients of the nll and of the log-softmax (loss_parallel: its
        # one-hot, exp and sum) in fp32, and the bf16 logits' gradient.
        cast = 4 if s == 2 else 0
        loss_fwd = tokens * (s + cast + (4 if tp > 1 else 0)) * v_size / tp
        loss_bwd = tokens * ((12 if tp > 1 else 8) + (s if s == 2 else 0)) * v_size / tp
    # The SwiGLU's two F-wide gradients and the residual stream's.
    t_bwd = tokens * (2 * s * f / tp + s_res * c)

    layers_rank = layers // pp
    chunk_layers = layers // (pp * v)
    p_layer = counts.per_layer / tp
    first_extra = counts.embedding / tp
    last_extra = (counts.head + counts.final_norm) / tp

    def rank_memory(kind: str) -> MemoryBreakdown:
        first, last = kind in ("first", "only"), kind in ("last", "only")
        p_rank = layers_rank * p_layer + (first_extra if first else 0) + (last_extra if last else 0)
        params = 4 * p_rank / shards
        optim = 8 * p_rank / shards
        grads_full = 4 * p_rank
        grads_sharded = 4 * p_rank / shards
        grads_static = grads_full if accumulate else 0.0
        grads_new = 0.0 if grads_static else (grads_full if shards == 1 else grads_sharded)
        if workload.grad_sync == "microbatch" and shards > 1:
            grads_static = grads_sharded if (m > 1 or pp > 1) else 0.0
            grads_new = 0.0 if grads_static else grads_sharded
        # Micro-batch chunks in flight on this rank (each chunk: chunk_layers layers of one micro-batch).
        if pp == 1:
            chunks = 1
        elif v == 1:
            chunks = min(m, pp) if first else 1
        else:
            per_round = m // max(1, m // pp)
            warmup = (v - 1) * per_round + (2 * (pp - 1) if first else 0)
            chunks = min(m * v, warmup + 1)
        mbs_in_flight = math.ceil(chunks / v) if pp > 1 else 1
        acts_layers = tokens * chunks * chunk_layers * a_kept
        acts_layers += tokens * mbs_in_flight * (rope + (8 if first else 0))
        # What the final norm and the loss save, released before the layers' backward starts.
        acts_loss = tokens * (final_norm + loss_saved_tok) + loss_saved_const if last else 0.0
        acts = acts_layers + acts_loss
        recompute = tokens * a_layer if ckpt else 0.0
        # Buffers.
        fwd_buf = bwd_buf = layer_w = layer_grads = 0.0
        if shards > 1 or mixed:
            root = w_bytes * ((first_extra if first else 0) + (last_extra if last else 0))
            layer_w = w_bytes * p_layer
            # FSDP2 keeps the latest all-gather's flat output until the next all-gather starts (its
            # rule for reusing memory safely across streams): one layer's weights more, even at the loss.
            fwd_buf += root + layer_w
            # In backward: the layer computing, the one prefetched and its all-gather output; at the
            # end of each layer's backward its unsharded gradient and their fp32 reduce-scatter input
            # (unless gradients accumulate unsharded), as the layer's activations go.
            bwd_buf += root + 3 * layer_w
            layer_grads = 0.0 if accumulate else (w_bytes + 4) * p_layer
        elif layout.dp_replicate > 1:  # DDP's gradient buckets
            bwd_buf += 4 * p_rank
        if autocast:
            # Autocast's bf16 copy of each projection weight is saved for its backward: every
            # layer's, unsharded, from forward to backward. Checkpointed, a layer's copies go with
            # its forward, unless the autocast region (and its cache of casts) spans the backward,
            # as on the mesh path.
            held = ckpt and not mesh
            copies = 2 * counts.layer_matmul / tp * (1 if held else layers_rank)
            fwd_buf += 0 if held else copies
            bwd_buf += copies
        if pp > 1:  # receive buffers for activations and their gradients
            fwd_buf += 2 * v * tokens * c * s_res
            bwd_buf += 2 * v * tokens * c * s_res
        static = params + optim + grads_static
        forward = acts + fwd_buf + max(loss_fwd if last else 0.0, layer_w)
        # The layers' backward, at its two ends: every layer's activations and the head's new gradient,
        # or the first layer's activations and every new gradient but the first layer's and the
        # embedding's (made after it); plus the recomputed layer and the backward's buffers. The plain
        # loss's own backward comes first, while the loss's saved tensors are still there.
        head_share = (last_extra if last else 0.0) / p_rank
        late_share = (p_layer + (first_extra if first else 0.0)) / p_rank
        tail = tokens * (chunk_layers - 1) * a_kept
        bwd_start = acts_layers + grads_new * head_share
        bwd_end = acts_layers - tail + grads_new * (1 - late_share)
        # Inside a layer's backward: the SwiGLU's gradients at its start, or (FSDP) the unsharded
        # gradients at its end, once the layer's activations are freed.
        inner = max(t_bwd, layer_grads - tokens * a_layer)
        backward = max(bwd_start, bwd_end) + recompute + inner + bwd_buf
        if last and loss_bwd:  # the loss's backward: before any layer's, with the forward's buffers
            backward = max(backward, acts + loss_bwd + fwd_buf)
        optimizer = grads_new + 4 * p_rank / shards  # foreach temporaries
        phases = {"forward": forward, "backward": backward, "optimizer": optimizer}
        phase = max(phases, key=lambda k: phases[k])
        if phase == "forward":
            grads_at, acts_at = grads_static, acts
        elif phase == "backward":
            at_end = bwd_end > bwd_start
            grads_at = grads_static + grads_new * ((1 - late_share) if at_end else head_share)
            acts_at = (bwd_end - grads_new * (1 - late_share) if at_end else acts_layers) + recompute
        else:
            grads_at, acts_at = grads_static + grads_new, 0.0
        buf_at = phases[phase] - (grads_at - grads_static) - acts_at
        peak = static + phases[phase]
        return MemoryBreakdown(
            params=params,
            grads=grads_at,
            optimizer=optim,
            activations=acts_at,
            buffers=buf_at,
            peak=peak,
            phase=phase,
            rank=kind,
            activations_per_token_layer=a_kept,
            saved_activations=acts,
        )

    if pp == 1:
        memory = rank_memory("only")
    else:
        memory = max((rank_memory("first"), rank_memory("last")), key=lambda mb: mb.peak)

    # -- time -------------------------------------------------------------------------------------
    world = layout.world_size
    t = workload.seq_len
    flops_token = 6 * counts.matmul_per_token + 6 * layers * cq * t
    peak_flops = (cluster.fp32_tflops if precision == "fp32" else cluster.peak_tflops) * 1e12
    total_tokens = workload.tokens
    # Per local token of a micro-batch, on a tensor-parallel rank: a layer (with its recompute), the head.
    layer_flops = (6 + (2 if ckpt else 0)) * (counts.layer_matmul + cq * t) / tp
    head_flops = 6 * v_size * c / tp
    # The slowest pipeline rank sets the pace: the last one also runs the output head and the loss.
    rank_flops = tokens * (layers_rank * layer_flops + head_flops)
    compute = m * rank_flops / (peak_flops * cluster.compute_efficiency)
    passes = 3 if ckpt else 2  # forward, backward (and the recompute's forward)
    tp_comm = 0.0
    if tp > 1:
        size = tokens * c * s  # one full-sequence activation of a micro-batch
        per_layer = 4 * passes * (tp - 1) / tp * size
        ends = 4 * (tp - 1) / tp * size  # embedding output and head input, forward and backward
        tp_comm = m * (layers_rank * per_layer + ends) / cluster.bandwidth(_span(layout, "tp"))
    sp_comm = 0.0
    if sp > 1:
        sp_size = tokens * s * (2 * cq + 2 * ckv) / tp
        sp_comm = m * layers_rank * passes * (sp - 1) / sp * sp_size / cluster.bandwidth(_span(layout, "sp"))
    p_rank_max = (
        layers_rank * p_layer + max(first_extra, last_extra)
        if pp > 1
        else (layers_rank * p_layer + first_extra + last_extra)
    )
    fsdp_comm = 0.0
    if shards > 1:
        gathers = 2 * m * (shards - 1) / shards * w_bytes * p_rank_max
        scatters = (m if workload.grad_sync == "microbatch" else 1) * (shards - 1) / shards * 4 * p_rank_max
        fsdp_comm += (gathers + scatters) / cluster.bandwidth(_span(layout, "fsdp"))
    if layout.dp_replicate > 1:
        r = layout.dp_replicate
        link = cluster.bandwidth(_span(layout, "dp_replicate"))
        fsdp_comm += 2 * (r - 1) / r * 4 * p_rank_max / shards / link
    per_microbatch = (compute + tp_comm + sp_comm) / m
    bubble = (pp - 1) / v * per_microbatch if pp > 1 else 0.0
    pp_comm = 0.0
    if pp > 1:
        hop = 2 * tokens * c * s / cluster.bandwidth(_span(layout, "pp"))
        pp_comm = (pp - 1) * v * hop
    busy = compute + tp_comm + sp_comm
    fsdp_exposed = 0.0
    if fsdp_comm:
        # FSDP prefetches the next layer while one computes: each micro-batch's first all-gather of
        # forward and of backward waits, and the step's last reduce-scatter (or all-reduce) does;
        # the rest hides behind ``overlap`` of the compute, and what exceeds it is exposed.
        per_layer = fsdp_comm / max(1, m) / max(1, layers_rank)
        startup = (2 * m + 1) * per_layer
        fsdp_exposed = min(fsdp_comm, startup + max(0.0, fsdp_comm - startup - cluster.overlap * busy))
    step = busy + bubble + fsdp_exposed + pp_comm
    time = TimeBreakdown(
        compute=compute,
        tp_comm=tp_comm,
        sp_comm=sp_comm,
        fsdp_comm=fsdp_comm,
        fsdp_exposed=fsdp_exposed,
        pp_comm=pp_comm,
        bubble=bubble,
        step=step,
    )
    model_flops = total_tokens * flops_token
    return Estimate(
        layout=layout,
        micro_batches=m,
        memory=memory,
        time=time,
        tokens_per_s_per_device=total_tokens / step / world,
        mfu=model_flops / (step * world * peak_flops),
        fits=memory.peak <= cluster.usable_bytes,
    )
