"""Preference losses over packed batches: DPO (sigmoid, IPO, hinge), ORPO, SimPO, KTO, Bradley-Terry.

**From packed logits to per-sequence log-probs.** A packed batch holds many completions back to
back, each a *segment* (``cu_seqlens``). :func:`segment_logps` sums the log-probability of every
target token (labels **unshifted**, ``labels[t]`` is the target of the logits at ``t - 1``, -100 for
no loss) into its segment with one ``index_add`` — no Python loop over segments and no host sync —
and counts the target tokens of each segment. A target whose position starts a segment is ignored
even if its label is set, so a segment never "predicts" the first token of the next one.
:func:`segment_ids_from_cu_seqlens` gives the per-token segment index, and :func:`gather_pairs`
moves per-segment values into per-pair chosen/rejected tensors from each segment's pair index and
chosen flag.

**Losses.** Every loss takes per-pair (or, for KTO, per-example) tensors and returns ``(loss,
metrics)``: ``loss`` a 0-dim tensor with gradient, ``metrics`` a dict of detached 0-dim tensors
(``rewards/chosen``, ``rewards/rejected``, ``margins``, ``accuracy`` and method-specific ones;
turning them into floats is the caller's single sync). By default the loss is the mean over the
batch. For gradient accumulation, pass ``num_pairs`` (and for ORPO ``num_chosen_tokens``) as the
totals of the *whole* optimizer step (over micro-batches and ranks): the loss is then the batch's
sum divided by those totals, so micro-batch losses add up to the step's mean exactly (1 x 8 == 8 x 1).

Formulas (``Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))``, sums over the
completion tokens; ``ā = log π(y) / |y|`` the length-normalised log-prob):

* DPO sigmoid (Rafailov et al. 2023) with conservative label smoothing ε (cDPO):
  ``-(1 - ε) logsigmoid(βΔ) - ε logsigmoid(-βΔ)``;
* IPO (Azar et al. 2023, eq. 17): ``(Δ̄ - 1 / (2β))²`` with ``Δ̄`` built from per-token averages
  (the length normalisation TRL uses and the IPO authors confirmed);
* hinge (SLiC): ``max(0, 1 - βΔ)``;
* ORPO (Hong et al. 2024): ``NLL(chosen completion) + λ · -logsigmoid(log odds(ā_c) - log odds(ā_r))``
  with ``odds(p) = p / (1 - p)``; ``beta`` is λ;
* SimPO (Meng et al. 2024): ``-logsigmoid(β ā_c - β ā_r - gamma)``, no reference model;
* KTO (Ethayarajh et al. 2024): desirable ``w_d (1 - sigmoid(β (r - z₀)))``, undesirable
  ``w_u (1 - sigmoid(β (z₀ - r)))`` with ``r`` the policy/reference log-ratio and ``z₀`` the KL reference
  point, estimated as the paper and TRL do: the batch mean of the log-ratio on *mismatched*
  (prompt, completion) pairs, detached and clamped at 0;
* Bradley-Terry reward model: ``-logsigmoid(r_c - r_r - margin)``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.train.data._errors import TrainConfigError
from lmstack.train.data._tokenize import IGNORE_INDEX

__all__ = [
    "DPOLossType",
    "dpo_loss",
    "gather_pairs",
    "kto_loss",
    "orpo_loss",
    "reward_model_loss",
    "segment_ids_from_cu_seqlens",
    "segment_logps",
    "simpo_loss",
    "token_logps",
]

logger = logging.getLogger(__name__)

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
Metrics = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------
# log-probs of packed segments
# ------------------------------------------------------------------------------------------------


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(logits)[i, targets[i]]`` computed ``chunk`` rows at a time, forward and backward.

    Only ``logits`` (in its own dtype) and the fp32 log-normaliser per row are kept for backward, so
    no fp32 ``[N, V]`` tensor ever exists whole: the gradient ``g · (onehot - softmax)`` is rebuilt
    chunk by chunk into a tensor of ``logits``' dtype.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, targets: Tensor, chunk: int
    ) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk):
            piece = logits[start : start + chunk].float()
            lse[start : start + chunk] = piece.logsumexp(-1)
            picked = piece.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
            out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk: int = ctx.chunk  # type: ignore[attr-defined]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk):
            g = grad_out[start : start + chunk, None].float()
            probs = (logits[start : start + chunk].float() - lse[start : start + chunk, None]).exp()
            piece = -g * probs
            piece.scatter_add_(-1, targets[start : start + chunk, None], g)
            grad[start : start + chunk] = piece.to(grad.dtype)
        return grad, None, None


def token_logps(logits: Tensor, targets: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each target token, in fp32.

    Args:
        logits: ``[N, V]`` logits (any float dtype).
        targets: ``[N]`` target ids (every entry a valid id; mask afterwards).
        chunk_size: Rows per chunk. None computes ``log_softmax`` of the whole ``[N, V]`` in fp32 at
            once (plain autograd); a number never holds more than ``chunk_size`` rows in fp32, in
            forward or backward (a custom autograd function), for large vocabularies.

    Returns:
        ``[N]`` fp32 log-probs.

    Raises:
        TrainConfigError: ``chunk_size`` is not positive.
    """
    if chunk_size is None:
        return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    if chunk_size < 1:
        raise TrainConfigError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    result: Tensor = _ChunkedTokenLogps.apply(logits, targets, chunk_size)
    return result


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, num_tokens: int | None = None) -> Tensor:
    """The segment index of every token of a packed batch, from its cumulative lengths.

    Args:
        cu_seqlens: ``[S + 1]`` cumulative segment lengths ``[0, len0, len0 + len1, ...]`` over the
            flattened tokens (as in :class:`lmstack.train.data.PackedBatch`).
        num_tokens: Tokens in the batch (default ``cu_seqlens[-1]``, which costs one host sync).

    Returns:
        ``[num_tokens]`` int64 segment indices (token ``t`` is in segment ``i`` when
        ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``).
    """
    n = int(cu_seqlens[-1]) if num_tokens is None else num_tokens
    positions = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).long()


def segment_logps(
    logits: Tensor,
    labels: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-segment sums of target-token log-probs, and target-token counts, of a packed batch.

    Args:
        logits: ``[T, V]``, ``[1, T, V]`` or ``[B, T, V]`` logits of the packed tokens.
        labels: Unshifted labels of the same leading shape (``labels[..., t]`` is the target of the
            logits at ``t - 1``; -100 where no loss is taken).
        segment_ids: Segment index of every token, same leading shape (or flattened over ``B * T``,
            as :func:`segment_ids_from_cu_seqlens` gives it). Negative ids are ignored.
        num_segments: ``S``; ids must be below it.
        chunk_size: See :func:`token_logps`.

    Returns:
        ``(summed_logp [S], token_count [S])``: fp32 sums (with gradient) and int64 counts. A target
        is counted only where its label is not -100 and the previous token lies in the same segment.

    Raises:
        TrainConfigError: The shapes disagree.
    """
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    if logits.dim() != 3:
        raise TrainConfigError(f"logits must be [T, V] or [B, T, V], got shape {tuple(logits.shape)}")
    rows, length, vocab = logits.shape
    if labels.numel() != rows * length or segment_ids.numel() != rows * length:
        raise TrainConfigError(
            f"labels ({tuple(labels.shape)}) and segment_ids ({tuple(segment_ids.shape)}) must have "
            f"one entry per token of logits {tuple(logits.shape)}"
        )
    # Work on the flattened tokens so the logits are only viewed, never copied: the logits at
    # flat position i predict the label at i + 1, except across a row boundary (masked below).
    target = labels.reshape(-1)[1:]
    segments = segment_ids.reshape(-1).long()
    seg = segments[1:]
    valid = (target != IGNORE_INDEX) & (seg == segments[:-1]) & (seg >= 0)
    if rows > 1:
        row_start = torch.arange(1, rows * length, device=labels.device) % length == 0
        valid &= ~row_start
    safe_target = torch.where(valid, target, 0)
    logp = token_logps(logits.reshape(-1, vocab)[:-1], safe_target, chunk_size=chunk_size)
    index = torch.where(valid, seg, 0)
    sums = torch.zeros(num_segments, dtype=torch.float32, device=logits.device)
    sums = sums.index_add(0, index, torch.where(valid, logp, 0.0))
    counts = torch.zeros(num_segments, dtype=torch.int64, device=logits.device)
    counts = counts.index_add(0, index, valid.long())
    return sums, counts


def gather_pairs(
    values: Tensor, pair_index: Tensor, is_chosen: Tensor, num_pairs: int
) -> tuple[Tensor, Tensor]:
    """Per-segment values into per-pair chosen and rejected tensors.

    Args:
        values: ``[S]`` per-segment values (summed log-probs, token counts, rewards).
        pair_index: ``[S]`` the pair each segment belongs to, -1 for segments of no pair (padding).
        is_chosen: ``[S]`` bool, True for the chosen completion of its pair.
        num_pairs: ``P``; every pair must have exactly one chosen and one rejected segment (not
            checked, to avoid a host sync; a missing one reads as 0).

    Returns:
        ``(chosen [P], rejected [P])`` in ``values``' dtype, differentiable.
    """
    member = pair_index >= 0
    index = torch.where(member, pair_index, 0).long()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    chosen_values = torch.where(member & is_chosen, values, zero)
    rejected_values = torch.where(member & ~is_chosen, values, zero)
    chosen = torch.zeros(num_pairs, dtype=values.dtype, device=values.device).index_add(
        0, index, chosen_values
    )
    rejected = torch.zeros(num_pairs, dtype=values.dtype, device=values.device).index_add(
        0, index, rejected_values
    )
    return chosen, rejected


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _reduce(per_item: Tensor, count: Tensor | float | None) -> Tensor:
    """The mean of ``per_item``, or its sum over ``count`` (the step's total) when given."""
    if count is None:
        return per_item.mean()
    return per_item.sum() / count


def _mean(x: Tensor) -> Tensor:
    return x.detach().float().mean()


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "margins": _mean(chosen_rewards - rejected_rewards),
        "accuracy": _mean((chosen_rewards > rejected_rewards).float()),
    }


def _check_beta(beta: float, what: str) -> None:
    if not beta > 0:
        raise TrainConfigError(f"{what}.beta must be positive, got {beta}")


def _check_smoothing(label_smoothing: float, what: str) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise TrainConfigError(
            f"{what}.label_smoothing must be in [0, 0.5) (the assumed share of flipped labels), "
            f"got {label_smoothing}"
        )


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - ε) logsigmoid(x) - ε logsigmoid(-x)``: the logistic loss with a share ε of labels flipped."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    num_pairs: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Direct preference optimisation and its IPO and hinge variants.

    Args:
        policy_chosen: ``[P]`` summed completion log-probs of the chosen answers under the policy.
        policy_rejected: ``[P]`` the same for the rejected answers.
        reference_chosen: ``[P]`` the chosen answers under the reference model (no gradient).
        reference_rejected: ``[P]`` the rejected answers under the reference model.
        beta: Inverse temperature β (for IPO: the regulariser τ).
        loss: ``sigmoid`` (DPO), ``ipo`` or ``hinge``.
        label_smoothing: ε of conservative DPO (``sigmoid`` only): the assumed share of pairs whose
            preference is flipped.
        chosen_tokens: ``[P]`` completion token counts of the chosen answers (``ipo`` needs them:
            its log-ratios are per-token averages).
        rejected_tokens: ``[P]`` the same for the rejected answers.
        num_pairs: Divide the summed loss by this (the pairs of the whole optimizer step) instead of
            taking the batch mean.

    Returns:
        ``(loss, metrics)``: metrics ``rewards/chosen`` and ``rewards/rejected`` (β times the
        policy/reference log-ratio, batch means), ``margins``, ``accuracy`` (share of pairs whose
        chosen reward is higher), ``logps/chosen``, ``logps/rejected``.

    Raises:
        TrainConfigError: An unknown ``loss``, a non-positive ``beta``, label smoothing with
            ``ipo``/``hinge`` or outside ``[0, 0.5)``, or ``ipo`` without token counts.
    """
    _check_beta(beta, "dpo")
    _check_smoothing(label_smoothing, "dpo")
    if loss not in ("sigmoid", "ipo", "hinge"):
        raise TrainConfigError(f"dpo.loss must be 'sigmoid', 'ipo' or 'hinge', got {loss!r}")
    if label_smoothing and loss != "sigmoid":
        raise TrainConfigError(
            f"dpo.label_smoothing applies to the 'sigmoid' loss only, not {loss!r}; set it to 0"
        )
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        per_pair = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise TrainConfigError(
                "dpo.loss='ipo' compares per-token log-ratios: pass chosen_tokens and rejected_tokens"
            )
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (per_token - 1 / (2 * beta)) ** 2
    metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps/chosen"] = _mean(policy_chosen)
    metrics["logps/rejected"] = _mean(policy_rejected)
    return _reduce(per_pair, num_pairs), metrics


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 0.1,
    num_pairs: Tensor | float | None = None,
    num_chosen_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Odds-ratio preference optimisation: SFT on the chosen answer plus an odds-ratio penalty.

    ``loss = NLL + β · mean(-logsigmoid(log odds(ā_c) - log odds(ā_r)))`` where ``ā`` is the per-token
    average log-prob of a completion and NLL the token-mean cross-entropy of the chosen
    completions (the paper's ``L_SFT``; TRL's ORPO trainer also counts the prompt tokens).

    Args:
        policy_chosen: ``[P]`` summed completion log-probs of the chosen answers.
        policy_rejected: ``[P]`` the same for the rejected answers.
        chosen_tokens: ``[P]`` completion token counts of the chosen answers.
        rejected_tokens: ``[P]`` the same for the rejected answers.
        beta: λ, the weight of the odds-ratio term.
        num_pairs: Divide the summed odds-ratio term by this (pairs of the whole step) instead of
            taking the batch mean.
        num_chosen_tokens: Divide the summed NLL by this (chosen completion tokens of the whole
            step) instead of this batch's ``chosen_tokens.sum()``.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` and ``rewards/rejected`` are β times ``ā`` (as in
        the paper's code and TRL), ``margins``, ``accuracy``, ``nll_loss``, ``log_odds_ratio`` (batch
        mean of ``logsigmoid(log odds)``), ``log_odds_chosen`` (batch mean of the log odds ratio).

    Raises:
        TrainConfigError: A non-positive ``beta``.
    """
    _check_beta(beta, "orpo")
    chosen_avg = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected_avg = policy_rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    tokens = chosen_tokens.sum().clamp(min=1) if num_chosen_tokens is None else num_chosen_tokens
    nll = -policy_chosen.float().sum() / tokens
    loss = nll + beta * _reduce(-ratio, num_pairs)
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg)
    metrics.update(
        {
            "nll_loss": nll.detach(),
            "log_odds_ratio": _mean(ratio),
            "log_odds_chosen": _mean(log_odds),
        }
    )
    return loss, metrics


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    num_pairs: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Simple preference optimisation: length-normalised rewards with a target margin, no reference.

    ``loss = -(1 - ε) logsigmoid(m) - ε logsigmoid(-m)`` with ``m = β ā_c - β ā_r - gamma``. The
    defaults (β = 2, gamma = 1, so gamma/β = 0.5) are in the range the SimPO paper recommends.

    Args:
        policy_chosen: ``[P]`` summed completion log-probs of the chosen answers.
        policy_rejected: ``[P]`` the same for the rejected answers.
        chosen_tokens: ``[P]`` completion token counts of the chosen answers.
        rejected_tokens: ``[P]`` the same for the rejected answers.
        beta: β, the reward scale.
        gamma: The target reward margin.
        label_smoothing: ε, as in conservative DPO.
        num_pairs: Divide the summed loss by this instead of taking the batch mean.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` and ``rewards/rejected`` are ``β ā``, ``margins``,
        ``accuracy``, ``logps/chosen``, ``logps/rejected`` (the per-token averages).

    Raises:
        TrainConfigError: A non-positive ``beta`` or label smoothing outside ``[0, 0.5)``.
    """
    _check_beta(beta, "simpo")
    _check_smoothing(label_smoothing, "simpo")
    chosen_avg = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected_avg = policy_rejected.float() / rejected_tokens.clamp(min=1)
    per_pair = _smoothed_sigmoid(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg)
    metrics["logps/chosen"] = _mean(chosen_avg)
    metrics["logps/rejected"] = _mean(rejected_avg)
    return _reduce(per_pair, num_pairs), metrics


def kto_loss(
    policy: Tensor,
    reference: Tensor,
    desirable: Tensor,
    *,
    policy_kl: Tensor | None = None,
    reference_kl: Tensor | None = None,
    kl: Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    num_examples: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Kahneman-Tversky optimisation on unpaired examples labelled desirable or undesirable.

    The KL reference point ``z₀`` is, as in the KTO paper and TRL's trainer, the batch mean of
    ``policy_kl - reference_kl`` (log-probs of *mismatched* pairs: prompt ``i`` with the completion
    of example ``i + 1``), detached and clamped at 0. Under data parallelism pass ``kl`` instead,
    the mean over all ranks (TRL all-gathers it). With neither, ``z₀ = 0``.

    Args:
        policy: ``[N]`` summed completion log-probs under the policy.
        reference: ``[N]`` the same under the reference model.
        desirable: ``[N]`` bool, True for desirable examples.
        policy_kl: ``[M]`` policy log-probs of the mismatched completions.
        reference_kl: ``[M]`` reference log-probs of the mismatched completions.
        kl: A precomputed ``z₀`` (overrides ``policy_kl``/``reference_kl``; still clamped at 0).
        beta: β.
        desirable_weight: ``w_d``, weight of the desirable losses.
        undesirable_weight: ``w_u``, weight of the undesirable losses (the paper suggests
            ``w_d n_d / (w_u n_u)`` in ``[1, 4/3]``).
        num_examples: Divide the summed loss by this instead of taking the batch mean.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` (mean ``β r`` over desirable examples, NaN if none),
        ``rewards/rejected`` (over undesirable ones), ``margins`` (their difference), ``accuracy``
        (share of examples whose ``r - z₀`` has the sign of their label), ``kl`` (``z₀``).

    Raises:
        TrainConfigError: A non-positive ``beta`` or weight, or only one of the KL log-probs.
    """
    _check_beta(beta, "kto")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise TrainConfigError(
            f"kto weights must be positive, got desirable_weight={desirable_weight}, "
            f"undesirable_weight={undesirable_weight}"
        )
    if (policy_kl is None) != (reference_kl is None):
        raise TrainConfigError("kto_loss needs both policy_kl and reference_kl, or neither")
    if kl is not None:
        z0 = kl.detach().float().clamp(min=0)
    elif policy_kl is not None and reference_kl is not None:
        z0 = (policy_kl.float() - reference_kl.float()).mean().detach().clamp(min=0)
    else:
        z0 = torch.zeros((), device=policy.device)
    ratio = policy.float() - reference.float()
    good = desirable.bool()
    per_example = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    rewards = beta * ratio.detach()
    goodf = good.float()
    n_good, n_bad = goodf.sum(), (1 - goodf).sum()
    chosen = (rewards * goodf).sum() / n_good
    rejected = (rewards * (1 - goodf)).sum() / n_bad
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "margins": chosen - rejected,
        "accuracy": _mean(((ratio.detach() - z0) > 0) == good),
        "kl": z0,
    }
    return _reduce(per_example, num_examples), metrics


def reward_model_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coefficient: float | None = None,
    num_pairs: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry loss of a scalar reward model: ``-logsigmoid(r_c - r_r - margin)``.

    Args:
        chosen_rewards: ``[P]`` rewards of the chosen answers.
        rejected_rewards: ``[P]`` rewards of the rejected answers.
        margin: Optional ``[P]`` (or scalar) margin by which the chosen reward should win (Llama 2).
        center_coefficient: Optional weight of ``mean((r_c + r_r)²)``, keeping rewards centred
            (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``).
        num_pairs: Divide the summed loss by this instead of taking the batch mean.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen``, ``rewards/rejected``, ``margins``, ``accuracy``.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    loss = _reduce(-F.logsigmoid(diff), num_pairs)
    if center_coefficient:
        centred = (chosen_rewards.float() + rejected_rewards.float()) ** 2
        loss = loss + center_coefficient * _reduce(centred, num_pairs)
    return loss, _pair_metrics(chosen_rewards.float(), rejected_rewards.float())
