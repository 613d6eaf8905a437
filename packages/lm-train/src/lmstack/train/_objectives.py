"""What a training step minimises: next-token cross-entropy, or a preference loss over packed pairs.

The loop (:mod:`lmstack.train._loop`) is the same for every recipe; an :class:`Objective` tells it
which dataset to build, which totals normalise a step (loss tokens, pairs, ...), and how one
micro-batch turns into a loss and metric sums. Every objective divides by the totals of the *whole*
optimizer step (all micro-batches, all ranks), so ``grad_accum`` micro-batches of one bin give the
gradient of one micro-batch of ``grad_accum`` bins, and N processes equal one with N times the batch.

* :class:`LanguageModeling`: summed token cross-entropy over the step's loss tokens (pretrain, sft,
  lora).
* :class:`PairwisePreference`: DPO (sigmoid, IPO, hinge), ORPO, SimPO and the Bradley-Terry reward
  model on :class:`~lmstack.train.data.PreferenceBatch` (packed) or
  :class:`~lmstack.train.data._preference_packing.PaddedPreferenceBatch` (padded) batches, normalised
  by the step's pairs.
* :class:`KTO`: Kahneman-Tversky optimisation on unpaired samples, normalised by the step's samples.

Per-sequence log-probs come from one forward over the batch with the output head applied only at the
positions that carry a loss (``logits_indices``: the completions), summed per sequence with one
``index_add``. Reference log-probs come from :mod:`lmstack.train._reference`: precomputed once and
cached, or (LoRA) computed live with the adapters disabled.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core import Tokenizer
from lmstack.train._fused_loss import FusedLinearCrossEntropy
from lmstack.train._preference_losses import (
    DPOLossType,
    dpo_loss,
    kto_loss,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
    token_logps,
)
from lmstack.train.data import IGNORE_INDEX, DataConfig, PackedBatch, build_dataset
from lmstack.train.data._errors import TrainConfigError
from lmstack.train.data._preference_packing import (
    KTOBatch,
    PaddedKTOBatch,
    PaddedPreferenceBatch,
    PreferenceBatch,
    build_preference_dataset,
)

if TYPE_CHECKING:
    from lmstack.train._reference import ReferenceLogps, ReferenceMode

__all__ = [
    "KTO",
    "LanguageModeling",
    "Objective",
    "PairwisePreference",
    "SegmentLayout",
    "logps_from_logits",
    "loss_targets",
    "segment_layout",
    "sequence_logps",
]

logger = logging.getLogger(__name__)

MetricSums = dict[str, Tensor]
PairMethod = Literal["dpo", "orpo", "simpo", "rm"]


def loss_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The positions whose next token carries loss, and those tokens (labels unshifted, as in batches).

    Returns:
        Flat indices into the ``B * T`` positions (for ``CausalLM.forward(..., logits_indices=)``)
        and the target token of each.
    """
    target = labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, target[rows, cols]


class Objective(ABC):
    """The part of a training step that differs between recipes.

    Attributes:
        name: Shown in logs (``lm``, ``dpo``, ``kto`` ...).
        primary: The key of :meth:`step_totals` that must be positive for a step to train.
        denominators: For each metric :meth:`loss` sums, the key of :meth:`step_totals` it is
            divided by for the step's record (None: the sums are already step means).
        needs_reference: Whether :attr:`reference` must be set before training.
        deferred_normalization: The loss is one sum divided by the step's ``primary`` total, so the
            loop may pass ``{primary: 1.0}`` as totals and divide the gradients afterwards: the totals
            then share the step's single all-reduce with the loss instead of needing one of their own.
    """

    name = "objective"
    primary = "loss_tokens"
    needs_reference = False
    deferred_normalization = False

    def __init__(self) -> None:
        self.denominators: dict[str, str | None] = {}
        self.reference: ReferenceLogps | None = None
        #: How the loop gets reference log-probs (see :mod:`lmstack.train._reference`).
        self.reference_mode: ReferenceMode = "precomputed"
        #: What identifies the reference weights in the cache key (set by the recipe).
        self.reference_tag = ""

    @abstractmethod
    def build_dataset(self, data: DataConfig, tokenizer: Tokenizer) -> Any:
        """The dataset of this objective (anything with ``__len__``, ``__getitem__`` and ``collate``)."""

    @abstractmethod
    def step_totals(self, window: Sequence[Any]) -> dict[str, float]:
        """Counts over the step's micro-batches on this rank (host side; the loop sums them over ranks)."""

    @abstractmethod
    def loss(
        self, module: nn.Module, batch: Any, totals: dict[str, float], world_size: int
    ) -> tuple[Tensor, MetricSums]:
        """One micro-batch's share of the step loss (times ``world_size``), and its metric sums."""


class LanguageModeling(Objective):
    """Summed next-token cross-entropy over the step's loss tokens (pretrain, sft, lora).

    Args:
        fused: Compute the output head and the cross-entropy together in chunks of rows
            (:class:`~lmstack.train._fused_loss.FusedLinearCrossEntropy`), never holding the
            ``[loss tokens, vocabulary]`` logits; heads other than a plain ``nn.Linear`` (a LoRA or
            4-bit head) take the plain path either way.
    """

    name = "lm"
    primary = "loss_tokens"
    deferred_normalization = True

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused

    def build_dataset(self, data: DataConfig, tokenizer: Tokenizer) -> Any:
        return build_dataset(data, tokenizer)

    def step_totals(self, window: Sequence[Any]) -> dict[str, float]:
        return {"loss_tokens": float(sum(b.num_loss_tokens for b in window))}

    def loss(
        self, module: nn.Module, batch: PackedBatch, totals: dict[str, float], world_size: int
    ) -> tuple[Tensor, MetricSums]:
        # Only the positions that carry loss go through the lm head: with the loss on assistant turns
        # that is a small share of the tokens, and the [tokens, vocab] logits are the largest activation.
        indices, targets = loss_targets(batch.labels)
        attn = batch.attention()
        if self.fused:
            head = FusedLinearCrossEntropy(targets)
            summed = module(batch.input_ids, batch.position_ids, attn, logits_indices=indices, head=head)
        else:
            logits = module(batch.input_ids, batch.position_ids, attn, logits_indices=indices)
            summed = F.cross_entropy(logits.float(), targets, reduction="sum")
        return summed * (world_size / totals["loss_tokens"]), {}


# ------------------------------------------------------------------------------------------------
# where the sequences of a preference batch are
# ------------------------------------------------------------------------------------------------

AnyPreferenceBatch = PreferenceBatch | PaddedPreferenceBatch | KTOBatch | PaddedKTOBatch


@dataclass
class SegmentLayout:
    """Where each sequence of a (packed or padded) preference batch is, on the batch's device.

    Attributes:
        segment_ids: ``[B * T]`` the sequence (segment) of every token; padding may share a segment
            (its labels are -100, so it never counts).
        num_segments: ``S``.
        first: ``[P]`` the segment of each pair's chosen sequence, or of each KTO sample.
        second: ``[P]`` the segment of each pair's rejected sequence (None for KTO).
        last_token: ``[S]`` the flat index of each segment's last real token.
        unit_index: ``[P]`` each pair's (or sample's) index in the tokenized dataset.
    """

    segment_ids: Tensor
    num_segments: int
    first: Tensor
    second: Tensor | None
    last_token: Tensor
    unit_index: Tensor


def segment_layout(batch: AnyPreferenceBatch) -> SegmentLayout:
    """The :class:`SegmentLayout` of a batch, computed without a host synchronisation."""
    device = batch.input_ids.device
    if isinstance(batch, (PreferenceBatch, KTOBatch)):
        last = batch.cu_seqlens[1:].long() - 1
        if isinstance(batch, PreferenceBatch):
            first, second, index = batch.chosen_segments, batch.rejected_segments, batch.pair_index
        else:
            first, second, index = batch.completion_segments, None, batch.sample_index
        return SegmentLayout(batch.segment_ids.reshape(-1), batch.num_segments, first, second, last, index)
    rows, length = batch.input_ids.shape
    segment_ids = torch.arange(rows, device=device).repeat_interleave(length)
    last = torch.arange(rows, device=device) * length + batch.attention_mask.sum(1).long() - 1
    if isinstance(batch, PaddedPreferenceBatch):
        pairs = torch.arange(batch.num_pairs, device=device)
        return SegmentLayout(segment_ids, rows, pairs, pairs + batch.num_pairs, last, batch.pair_index)
    return SegmentLayout(segment_ids, rows, torch.arange(rows, device=device), None, last, batch.sample_index)


def sequence_logps(
    module: nn.Module,
    batch: AnyPreferenceBatch,
    layout: SegmentLayout,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and completion token counts of every sequence of a batch.

    The output head runs only at the positions whose next token carries a loss, so the logits are
    ``[completion tokens, vocab]``, never ``[B * T, vocab]``.

    Args:
        module: The causal LM (or its data-parallel wrapper, or a module with a ``sequence_logps``
            method of this signature, which then scores the batch).
        batch: A preference or KTO batch, packed or padded.
        layout: Its :func:`segment_layout`.
        chunk_size: Compute the log-softmax in chunks of this many rows (see :func:`token_logps`).

    Returns:
        ``(logps [S], tokens [S])``: fp32 sums with gradient, and int64 counts.
    """
    # A module that scores batches its own way (sequence parallelism: each rank holds a slice of the
    # tokens) says so with a ``sequence_logps`` method.
    own = getattr(module, "sequence_logps", None)
    if callable(own):
        result: tuple[Tensor, Tensor] = own(batch, layout, chunk_size=chunk_size)
        return result
    loss = loss_targets(batch.labels)
    logits = module(batch.input_ids, batch.position_ids, batch.attention(), logits_indices=loss[0])
    return logps_from_logits(logits, batch, layout, chunk_size=chunk_size, loss=loss)


def logps_from_logits(
    logits: Tensor,
    batch: AnyPreferenceBatch,
    layout: SegmentLayout,
    *,
    chunk_size: int | None = None,
    loss: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sequence_logps` from the logits of the batch's :func:`loss_targets` positions, in order.

    A pipeline's last stage computes those logits itself (``logits_indices`` is its loss rows).
    ``loss`` is :func:`loss_targets` of the batch when the caller has it already.
    """
    indices, targets = loss if loss is not None else loss_targets(batch.labels)
    logp = token_logps(logits, targets, chunk_size=chunk_size)
    # The target at flat position i + 1 belongs to that position's segment; labels are -100 on every
    # sequence's first token, so a target never lies across a segment boundary.
    segment = layout.segment_ids[indices + 1]
    sums = torch.zeros(layout.num_segments, dtype=torch.float32, device=logp.device)
    sums = sums.index_add(0, segment, logp)
    counts = torch.zeros(layout.num_segments, dtype=torch.int64, device=logp.device)
    counts = counts.index_add(0, segment, torch.ones_like(segment))
    return sums, counts


def _completion_tokens(batch: Any, chosen: bool) -> int:
    """Loss tokens of the chosen (or rejected) completions of a CPU batch."""
    loss = batch.labels != IGNORE_INDEX
    if isinstance(batch, PreferenceBatch):
        is_chosen = batch.segment_is_chosen[batch.segment_ids]
        return int((loss & (is_chosen if chosen else ~is_chosen)).sum())
    half = batch.num_pairs
    return int(loss[:half].sum() if chosen else loss[half:].sum())


def _check_preference_batch(batch: Any, want: type, what: str) -> None:
    if not isinstance(batch, want):
        raise TrainConfigError(
            f"the {what} objective needs {want.__name__.lower()} data; got {type(batch).__name__}. "
            "Set data.format: preference for paired rows, data.format: kto for unpaired ones."
        )


# ------------------------------------------------------------------------------------------------
# pairs: DPO, IPO, hinge, ORPO, SimPO, reward model
# ------------------------------------------------------------------------------------------------


class PairwisePreference(Objective):
    """DPO (and its IPO and hinge variants), ORPO, SimPO, or a Bradley-Terry reward model on pairs.

    Args:
        method: ``dpo``, ``orpo``, ``simpo`` or ``rm``.
        beta: β of the method (ORPO: λ).
        loss: DPO's loss (``sigmoid``, ``ipo``, ``hinge``).
        label_smoothing: ε of DPO's sigmoid loss and of SimPO.
        gamma: SimPO's target margin.
        center_coefficient: Reward model: weight of ``mean((r_c + r_r)²)`` (0: off).
        chunk_size: Log-softmax chunk rows (None: all at once).
    """

    primary = "pairs"

    def __init__(
        self,
        method: PairMethod,
        *,
        beta: float = 0.1,
        loss: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        gamma: float = 1.0,
        center_coefficient: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if method not in ("dpo", "orpo", "simpo", "rm"):
            raise TrainConfigError(f"unknown pairwise method {method!r}")
        self.method = method
        self.name = method
        self.beta, self.dpo_loss_type, self.label_smoothing = beta, loss, label_smoothing
        self.gamma, self.center_coefficient, self.chunk_size = gamma, center_coefficient, chunk_size
        self.needs_reference = method == "dpo"
        names = ["rewards/chosen", "rewards/rejected", "margins", "accuracy"]
        if method in ("dpo", "simpo"):
            names += ["logps/chosen", "logps/rejected"]
        self.denominators = dict.fromkeys(names, "pairs")
        if method == "orpo":
            self.denominators.update(nll_loss=None, log_odds_ratio="pairs", log_odds_chosen="pairs")

    def build_dataset(self, data: DataConfig, tokenizer: Tokenizer) -> Any:
        return build_preference_dataset(data, tokenizer, format=_paired_format(data.format))

    def step_totals(self, window: Sequence[Any]) -> dict[str, float]:
        for b in window:
            _check_preference_batch(b, (PreferenceBatch, PaddedPreferenceBatch), self.name)  # type: ignore[arg-type]
        totals = {"pairs": float(sum(b.num_pairs for b in window))}
        if self.method == "orpo":
            totals["chosen_tokens"] = float(sum(_completion_tokens(b, True) for b in window))
        return totals

    def loss(
        self,
        module: nn.Module,
        batch: PreferenceBatch | PaddedPreferenceBatch,
        totals: dict[str, float],
        world_size: int,
    ) -> tuple[Tensor, MetricSums]:
        layout = segment_layout(batch)
        assert layout.second is not None
        pairs = totals["pairs"] / world_size  # so that the ranks' gradient average gives the step mean
        if self.method == "rm":
            own = getattr(module, "sequence_rewards", None)  # sequence parallelism (as sequence_logps)
            if callable(own):
                rewards = own(batch, layout)
            else:
                attn = batch.attention()
                rewards = module(batch.input_ids, batch.position_ids, attn, indices=layout.last_token)
            chosen_r, rejected_r = rewards[layout.first], rewards[layout.second]
            loss, metrics = reward_model_loss(
                chosen_r,
                rejected_r,
                center_coefficient=self.center_coefficient or None,
                num_pairs=pairs,
            )
            return loss, _sums(metrics, batch.num_pairs, self.denominators)
        logps, counts = sequence_logps(module, batch, layout, chunk_size=self.chunk_size)
        chosen, rejected = logps[layout.first], logps[layout.second]
        chosen_n, rejected_n = counts[layout.first], counts[layout.second]
        if self.method == "dpo":
            assert self.reference is not None, "DPO needs reference log-probs"
            ref = self.reference.pairs(batch, layout, module)
            loss, metrics = dpo_loss(
                chosen,
                rejected,
                ref[0],
                ref[1],
                beta=self.beta,
                loss=self.dpo_loss_type,
                label_smoothing=self.label_smoothing,
                chosen_tokens=chosen_n,
                rejected_tokens=rejected_n,
                num_pairs=pairs,
            )
        elif self.method == "orpo":
            loss, metrics = orpo_loss(
                chosen,
                rejected,
                chosen_n,
                rejected_n,
                beta=self.beta,
                num_pairs=pairs,
                num_chosen_tokens=totals["chosen_tokens"] / world_size,
            )
            # nll_loss is this micro-batch's share of the step's token mean: the shares add up.
            metrics["nll_loss"] = metrics["nll_loss"] / world_size
        else:
            loss, metrics = simpo_loss(
                chosen,
                rejected,
                chosen_n,
                rejected_n,
                beta=self.beta,
                gamma=self.gamma,
                label_smoothing=self.label_smoothing,
                num_pairs=pairs,
            )
        return loss, _sums(metrics, batch.num_pairs, self.denominators)


def _sums(metrics: dict[str, Tensor], count: int, denominators: dict[str, str | None]) -> MetricSums:
    """Batch means back into sums (so micro-batches and ranks add up), except already-additive ones."""
    return {
        name: metrics[name].detach().float() * (count if denominators[name] else 1.0) for name in denominators
    }


def _paired_format(format: str) -> str:
    if format == "kto":
        raise TrainConfigError(
            "data.format: kto holds unpaired rows, which this recipe cannot train on; use "
            "`lmstack train kto`, or data.format: preference for paired rows",
            field="data.format",
        )
    return "preference" if format == "auto" else format


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------


class KTO(Objective):
    """Kahneman-Tversky optimisation on unpaired (completion, desirable?) samples.

    The KL reference point ``z₀`` is estimated per micro-batch from the batch's own completions (the
    mean policy/reference log-ratio over every rank, detached, clamped at 0), which needs no second
    forward. The KTO paper and TRL estimate it on *mismatched* (prompt, completion) pairs, at the cost
    of one more forward per batch; :func:`~lmstack.train.kto_loss` accepts either.

    Args:
        beta: β.
        desirable_weight: Weight of the desirable samples' losses.
        undesirable_weight: Weight of the undesirable samples' losses.
        chunk_size: Log-softmax chunk rows (None: all at once).
    """

    name = "kto"
    primary = "samples"
    needs_reference = True

    def __init__(
        self,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.denominators = {
            "rewards/chosen": "desirable",
            "rewards/rejected": "undesirable",
            "accuracy": "samples",
            "kl": "micro_batches",
        }
        self.beta, self.chunk_size = beta, chunk_size
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def build_dataset(self, data: DataConfig, tokenizer: Tokenizer) -> Any:
        if data.format not in ("kto", "auto"):
            raise TrainConfigError(
                f"the kto recipe reads unpaired rows (prompt, completion, label): set data.format: kto, "
                f"not {data.format!r}",
                field="data.format",
            )
        return build_preference_dataset(data, tokenizer, format="kto")

    def step_totals(self, window: Sequence[Any]) -> dict[str, float]:
        for b in window:
            _check_preference_batch(b, (KTOBatch, PaddedKTOBatch), "kto")  # type: ignore[arg-type]
        desirable = sum(int(b.kto_labels.sum()) for b in window)
        samples = sum(b.num_samples for b in window)
        return {
            "samples": float(samples),
            "desirable": float(desirable),
            "undesirable": float(samples - desirable),
            "micro_batches": float(len(window)),
        }

    def loss(
        self, module: nn.Module, batch: KTOBatch | PaddedKTOBatch, totals: dict[str, float], world_size: int
    ) -> tuple[Tensor, MetricSums]:
        layout = segment_layout(batch)
        logps, _ = sequence_logps(module, batch, layout, chunk_size=self.chunk_size)
        policy = logps[layout.first]
        assert self.reference is not None, "KTO needs reference log-probs"
        reference = self.reference.samples(batch, layout, module)
        ratio = (policy.detach() - reference).float()
        moments = torch.stack((ratio.sum(), torch.tensor(float(ratio.numel()), device=ratio.device)))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        z0 = moments[0] / moments[1].clamp(min=1)
        loss, metrics = kto_loss(
            policy,
            reference,
            batch.kto_labels,
            kl=z0,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            num_examples=totals["samples"] / world_size,
        )
        good = batch.kto_labels.float()
        rewards = self.beta * ratio
        sums = {
            "rewards/chosen": (rewards * good).sum(),
            "rewards/rejected": (rewards * (1 - good)).sum(),
            "accuracy": metrics["accuracy"] * batch.num_samples,
            # z0 is the same on every rank; the loop divides the sum by micro-batches times ranks.
            "kl": metrics["kl"],
        }
        return loss, sums
