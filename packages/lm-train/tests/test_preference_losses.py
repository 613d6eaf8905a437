"""Preference losses: packed log-probs, each loss against TRL (or the paper), packed == unpadded.

Tolerances: loss values against TRL's own code on the same fp32 tensors agree to ``1e-6`` relative
(same formula, same dtype; only the order of reductions differs). Packed-versus-unpadded compares a
whole model's loss and every parameter's gradient in fp32 to ``rtol=1e-5, atol=1e-6`` (measured:
at most 2.4e-7 on the loss and 3.6e-7 absolute on any gradient entry): the packed forward attends
per segment exactly like the unpadded one, but matrix products over a different number of rows may
sum in another order, which moves the last bits.
"""

from __future__ import annotations

import collections
import itertools
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmstack.core import CausalLM, ModelConfig, PackedAttention
from lmstack.train._preference_losses import (
    DPOLossType,
    dpo_loss,
    gather_pairs,
    kto_loss,
    orpo_loss,
    reward_model_loss,
    segment_ids_from_cu_seqlens,
    segment_logps,
    simpo_loss,
    token_logps,
)
from lmstack.train.data._errors import TrainConfigError

RTOL = 1e-6
# The TRL comparisons call trainer internals (loss code of TRL 1.x); other versions skip them.
TRL_VERSION = "1.16"


def _close(ours: torch.Tensor | float, theirs: torch.Tensor | float, rtol: float = RTOL) -> None:
    torch.testing.assert_close(
        torch.as_tensor(ours, dtype=torch.float32),
        torch.as_tensor(theirs, dtype=torch.float32),
        rtol=rtol,
        atol=1e-7,
    )


# ------------------------------------------------------------------------------------------------
# segment log-probs
# ------------------------------------------------------------------------------------------------


def _reference_segment_logps(
    logits: torch.Tensor, labels: torch.Tensor, cu: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment at a time, the textbook way: shift inside the segment, log_softmax, gather."""
    sums, counts = [], []
    for start, end in itertools.pairwise(cu):
        seg_logits, seg_labels = logits[start : end - 1], labels[start + 1 : end]
        keep = seg_labels != -100
        logp = F.log_softmax(seg_logits.float(), -1)[keep].gather(-1, seg_labels[keep][:, None]).squeeze(-1)
        sums.append(logp.sum())
        counts.append(int(keep.sum()))
    return torch.stack(sums), torch.tensor(counts)


def _packed_example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    cu = [0, 5, 12, 13, 20, 24]  # a one-token segment, and trailing "padding" as the last segment
    t, v = cu[-1], 11
    logits = torch.randn(t, v, generator=g)
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) < 0.3] = -100
    labels[20:] = -100  # padding carries no loss
    return logits, labels, cu


def test_segment_logps_matches_one_segment_at_a_time() -> None:
    logits, labels, cu = _packed_example()
    # A label on a segment's first token must not be predicted from the previous segment.
    labels[5] = 3
    cu_t = torch.tensor(cu, dtype=torch.int32)
    seg = segment_ids_from_cu_seqlens(cu_t, cu[-1])
    assert seg.tolist() == [0] * 5 + [1] * 7 + [2] + [3] * 7 + [4] * 4
    sums, counts = segment_logps(logits, labels, seg, len(cu) - 1)
    ref_sums, ref_counts = _reference_segment_logps(logits, labels, cu)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist()
    assert counts[4] == 0 and sums[4] == 0  # the padding segment
    # [1, T, V] and [B, T, V] (rows flattened, segments numbered over the whole batch) agree.
    sums3, _ = segment_logps(logits[None], labels[None], seg[None], len(cu) - 1)
    torch.testing.assert_close(sums3, sums)
    two_rows = torch.stack([logits[:12], logits[12:24]])
    rows_labels = torch.stack([labels[:12], labels[12:24]])
    rows_seg = seg.reshape(2, 12)
    sums_rows, counts_rows = segment_logps(two_rows, rows_labels, rows_seg.reshape(-1), len(cu) - 1)
    torch.testing.assert_close(sums_rows, ref_sums, rtol=1e-6, atol=1e-6)
    assert counts_rows.tolist() == ref_counts.tolist()


def test_segment_logps_never_predicts_across_rows() -> None:
    # Two rows that reuse segment id 0 and a label on row 1's first token: that token has no
    # logits in its own row to come from, so it must not be counted.
    logits, labels, _ = _packed_example(seed=2)
    rows_logits, rows_labels = logits[:24].reshape(2, 12, -1), labels[:24].reshape(2, 12).clone()
    rows_labels[1, 0] = 4
    sums, counts = segment_logps(rows_logits, rows_labels, torch.zeros(2, 12, dtype=torch.long), 1)
    s0, c0 = _reference_segment_logps(logits[:12], labels[:12], [0, 12])
    s1, c1 = _reference_segment_logps(logits[12:24], rows_labels[1], [0, 12])
    torch.testing.assert_close(sums, s0 + s1, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == (c0 + c1).tolist()


def test_chunked_token_logps_match_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 53, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 53, (37,), generator=g)
    weights = torch.randn(37, generator=g, dtype=torch.float64)
    plain = token_logps(logits, targets)
    (plain * weights).sum().backward()
    assert logits.grad is not None
    grad_plain = logits.grad.clone()
    logits.grad = None
    chunked = token_logps(logits, targets, chunk_size=8)
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, grad_plain, rtol=1e-6, atol=1e-7)
    # bf16 logits: the gradient keeps the logits' dtype and matches fp32's to bf16 precision.
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    (token_logps(low, targets, chunk_size=8) * weights.float()).sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), grad_plain.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(TrainConfigError, match="chunk_size"):
        token_logps(logits, targets, chunk_size=0)


def test_gather_pairs_routes_segments_to_pairs() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 99.0])
    pair_index = torch.tensor([1, 0, 0, 1, -1])
    is_chosen = torch.tensor([False, True, False, True, False])
    chosen, rejected = gather_pairs(values, pair_index, is_chosen, 2)
    assert chosen.tolist() == [2.0, 4.0] and rejected.tolist() == [3.0, 1.0]


# ------------------------------------------------------------------------------------------------
# each loss against TRL's own implementation
# ------------------------------------------------------------------------------------------------


def _accelerator() -> Any:
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
    )


def _trainer(cls: type, **attrs: Any) -> Any:
    """A TRL trainer with only the attributes its loss code reads (no model, data or Trainer init)."""
    trainer: Any = object.__new__(cls)
    trainer.__dict__.update(
        accelerator=_accelerator(),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer.__dict__.update(attrs)
    return trainer


class _LogProbModel:
    """Stands in for a TRL fused-LM-head forward: returns given per-token log-probs."""

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token

    def __call__(self, **kwargs: Any) -> Any:
        shape = self.per_token.shape
        return types.SimpleNamespace(
            log_probs=self.per_token,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def _completion_batch(n: int, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of (completion mask [n, L], masked per-token log-probs [n, L - 1])."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(prompt + 2, length + 1, (1,), generator=g))
        mask[row, prompt:end] = 1
    per_token = -torch.rand(n, length - 1, generator=g) * 3 * mask[:, 1:]
    return mask, per_token


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trl(loss: str) -> None:
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl import DPOTrainer

    pairs, beta = 6, 0.3
    mask, per_token = _completion_batch(2 * pairs)
    ref = torch.randn(2 * pairs) * 2 - 10
    trainer = _trainer(
        DPOTrainer, precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=[loss], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    theirs = trainer._compute_loss(_LogProbModel(per_token), inputs, return_outputs=False)
    logps, tokens = per_token.sum(1), mask.sum(1)
    ours, metrics = dpo_loss(
        logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=beta, loss=loss,  # type: ignore[arg-type]
        chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:],
    )  # fmt: skip
    _close(ours, theirs)
    logged = trainer._metrics["train"]
    for ours_key, trl_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("margins", "rewards/margins"),
        ("accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"),
    ]:
        _close(metrics[ours_key], logged[trl_key][-1], rtol=1e-5)


def test_conservative_dpo_matches_trl_label_smoothing() -> None:
    # TRL 1.x's DPOTrainer has no smoothed sigmoid any more; its CPO trainer keeps the cDPO formula
    # on whatever log-ratios it is given, so give it the DPO log-ratios.
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(8, generator=g) * 4 - 20 for _ in range(4))
    beta, eps = 0.2, 0.15
    trainer = _trainer(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    losses, _, _ = trainer.cpo_loss(pc - rc, pr - rr)
    ours, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    _close(ours, losses.mean())


def test_simpo_matches_trl() -> None:
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(4)
    pc, pr = torch.randn(8, generator=g) * 4 - 20, torch.randn(8, generator=g) * 4 - 20
    nc, nr = torch.randint(1, 30, (8,), generator=g), torch.randint(1, 30, (8,), generator=g)
    for beta, gamma, eps in [(2.0, 1.0, 0.0), (2.5, 0.3, 0.1)]:
        trainer = _trainer(
            CPOTrainer, alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps
        )
        # TRL's CPO/SimPO takes the length-averaged log-probs (average_log_prob=True for simpo).
        losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(pc / nc, pr / nr)
        ours, metrics = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=eps)
        _close(ours, losses.mean())
        _close(metrics["rewards/chosen"], chosen_rewards.mean())
        _close(metrics["margins"], (chosen_rewards - rejected_rewards).mean())


def test_orpo_matches_trl_odds_ratio_and_paper_nll() -> None:
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(5)
    nc, nr = torch.randint(1, 30, (8,), generator=g), torch.randint(1, 30, (8,), generator=g)
    # Per-token averages spanning both branches of log(1 - exp(x)) (around -log 2).
    avg_c, avg_r = -torch.rand(8, generator=g) * 3, -torch.rand(8, generator=g) * 3
    pc, pr = avg_c * nc, avg_r * nr
    beta = 0.25
    trainer = _trainer(ORPOTrainer, beta=beta)
    or_losses, chosen_rewards, _, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(avg_c, avg_r)
    ours, metrics = orpo_loss(pc, pr, nc, nr, beta=beta)
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); the paper's NLL is the chosen
    # completion's token-mean cross-entropy, i.e. -sum(log-probs) / tokens.
    nll = -pc.sum() / nc.sum()
    _close(ours, nll - or_losses.mean())
    _close(metrics["nll_loss"], nll)
    _close(metrics["log_odds_ratio"], log_odds_ratio)
    _close(metrics["log_odds_chosen"], log_odds_chosen)
    _close(metrics["rewards/chosen"], chosen_rewards.mean())


@pytest.mark.parametrize("with_kl", [True, False])
def test_kto_matches_trl(with_kl: bool) -> None:
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl.trainer.kto_trainer import KTOTrainer

    n, beta = 10, 0.2
    mask, per_token = _completion_batch(n, seed=6)
    g = torch.Generator().manual_seed(7)
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    ref = per_token.sum(1) + torch.randn(n, generator=g)
    kl_policy, kl_ref = torch.randn(n, generator=g) - 30, torch.randn(n, generator=g) - 30.5
    trainer = _trainer(
        KTOTrainer, precompute_ref_logps=True, calculate_KL=with_kl, loss_type="kto", beta=beta,
        desirable_weight=1.0, undesirable_weight=1.33,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda model, batch: kl_policy if with_kl else None
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    theirs = trainer._compute_loss(_LogProbModel(per_token), inputs, return_outputs=False)
    kl_args = {"policy_kl": kl_policy, "reference_kl": kl_ref} if with_kl else {}
    ours, metrics = kto_loss(
        per_token.sum(1), ref, label, beta=beta, desirable_weight=1.0, undesirable_weight=1.33, **kl_args
    )
    _close(ours, theirs)
    logged = trainer._metrics["train"]
    _close(metrics["kl"], logged["kl"][-1])
    _close(metrics["rewards/chosen"], logged["rewards/chosen"][-1], rtol=1e-5)
    _close(metrics["rewards/rejected"], logged["rewards/rejected"][-1], rtol=1e-5)
    _close(metrics["margins"], logged["rewards/margins"][-1], rtol=1e-5)
    if with_kl:
        assert float(metrics["kl"]) > 0.1  # the test exercises a non-trivial reference point


@pytest.mark.parametrize("margin", [False, True])
def test_reward_model_loss_matches_trl(margin: bool) -> None:
    pytest.importorskip("trl", minversion=TRL_VERSION)
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(12, 1, generator=g)
    margins = torch.rand(6, generator=g)
    trainer = _trainer(RewardTrainer, args=types.SimpleNamespace(center_rewards_coefficient=0.01))
    inputs: dict[str, Any] = {"input_ids": torch.zeros(12, 3), "attention_mask": torch.ones(12, 3)}
    if margin:
        inputs["margin"] = margins
    theirs = trainer.compute_loss(lambda **kw: types.SimpleNamespace(logits=rewards), inputs)
    ours, metrics = reward_model_loss(
        rewards[:6, 0], rewards[6:, 0], margin=margins if margin else None, center_coefficient=0.01
    )
    _close(ours, theirs)
    _close(metrics["accuracy"], (rewards[:6] > rewards[6:]).float().mean())


def test_losses_on_hand_computed_values() -> None:
    # Exact values, independent of any library: one pair with Δ = 2.
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([-5.0])
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    _close(loss, -torch.log(torch.sigmoid(torch.tensor(1.0))))
    _close(metrics["rewards/chosen"], 0.5)
    _close(metrics["rewards/rejected"], -0.5)
    assert float(metrics["accuracy"]) == 1.0
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss="hinge")
    _close(loss, 0.5)
    n = torch.tensor([2])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss="ipo", chosen_tokens=n, rejected_tokens=n)
    _close(loss, (1.0 - 1.0) ** 2)
    loss, _ = reward_model_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    _close(loss, torch.log(torch.tensor(2.0)))
    # SimPO: averages -1 and -2 over 2 and 3 tokens, β = 2, gamma = 1: m = 2 * 1 - 1 = 1.
    loss, _ = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
    _close(loss, torch.log1p(torch.exp(torch.tensor(-1.0))))
    # ORPO: p_c = 0.5 (odds 1), p_r = 0.2 (odds 1/4): log odds ratio log 4, -logsigmoid = log 1.25;
    # NLL of one chosen token = log 2.
    one = torch.tensor([1])
    loss, m = orpo_loss(torch.tensor([0.5]).log(), torch.tensor([0.2]).log(), one, one, beta=0.5)
    _close(loss, torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(1.25)))
    _close(m["log_odds_chosen"], torch.log(torch.tensor(4.0)))
    # KTO: z0 = mean(2 - 1.5, 1 - 0.5) = 0.5; desirable r = 1, undesirable r = -1, β = 1.
    loss, m = kto_loss(
        torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([True, False]),
        policy_kl=torch.tensor([2.0, 1.0]), reference_kl=torch.tensor([1.5, 0.5]), beta=1.0,
        undesirable_weight=2.0,
    )  # fmt: skip
    sig = torch.sigmoid
    _close(loss, ((1 - sig(torch.tensor(0.5))) + 2 * (1 - sig(torch.tensor(1.5)))) / 2)
    _close(m["kl"], 0.5)
    assert float(m["accuracy"]) == 1.0


def test_step_totals_make_accumulation_exact() -> None:
    g = torch.Generator().manual_seed(9)
    pc, pr, rc, rr = (torch.randn(8, generator=g) * 3 - 20 for _ in range(4))
    nc, nr = torch.randint(1, 20, (8,), generator=g), torch.randint(1, 20, (8,), generator=g)
    whole_dpo, _ = dpo_loss(pc, pr, rc, rr)
    whole_orpo, _ = orpo_loss(pc / 10, pr / 10, nc, nr)
    parts_dpo = sum(dpo_loss(pc[s], pr[s], rc[s], rr[s], num_pairs=8)[0] for s in (slice(0, 3), slice(3, 8)))
    parts_orpo = sum(
        orpo_loss(pc[s] / 10, pr[s] / 10, nc[s], nr[s], num_pairs=8, num_chosen_tokens=nc.sum())[0]
        for s in (slice(0, 3), slice(3, 8))
    )
    _close(parts_dpo, whole_dpo)
    _close(parts_orpo, whole_orpo)


def test_bad_settings_are_named() -> None:
    x = torch.zeros(2)
    with pytest.raises(TrainConfigError, match=r"dpo\.loss"):
        dpo_loss(x, x, x, x, loss="robust")  # type: ignore[arg-type]
    with pytest.raises(TrainConfigError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, loss="ipo")
    with pytest.raises(TrainConfigError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss="hinge", label_smoothing=0.1)
    with pytest.raises(TrainConfigError, match="beta"):
        simpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(TrainConfigError, match="reference_kl"):
        kto_loss(x, x, x.bool(), policy_kl=x)


# ------------------------------------------------------------------------------------------------
# the must-show: packed == unpadded, one pair at a time (loss and every gradient, fp32)
# ------------------------------------------------------------------------------------------------

VOCAB = 64


def _model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return CausalLM(config, dtype=torch.float32)


def _pairs(seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen completion, rejected completion) token lists of varied lengths."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [(tokens(2, 7), tokens(1, 9), tokens(1, 9)) for _ in range(4)]


def _packed_batch(
    pairs: list[tuple[list[int], list[int], list[int]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row: [prompt+chosen][prompt+rejected] per pair, then ``pad`` padding tokens.

    Returns input_ids, labels, positions, cu_seqlens, pair index and chosen flag per segment.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu, pair_index, chosen = [0], [], []
    for p, (prompt, good, bad) in enumerate(pairs):
        for completion, is_chosen in ((good, True), (bad, False)):
            seq = prompt + completion
            ids += seq
            labels += [-100] * len(prompt) + completion
            positions += list(range(len(seq)))
            cu.append(len(ids))
            pair_index.append(p)
            chosen.append(is_chosen)
    ids += [0] * pad
    labels += [-100] * pad
    positions += list(range(pad))
    cu.append(len(ids))
    pair_index.append(-1)
    chosen.append(False)
    return (
        torch.tensor([ids]),
        torch.tensor([labels]),
        torch.tensor([positions]),
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(pair_index),
        torch.tensor(chosen),
    )


def _sequence_logp(model: CausalLM, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Unpadded single-sequence forward; sum of the completion tokens' log-probs."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids)[0]
    logp = F.log_softmax(logits[:-1], -1)
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    return picked[len(prompt) - 1 :].sum()


def _packed_logps(
    model: CausalLM, pairs: list[tuple[list[int], list[int], list[int]]], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, labels, positions, cu, pair_index, is_chosen = _packed_batch(pairs, pad=5)
    logits = model(ids, positions, PackedAttention(cu, use_flash=False))
    segments = segment_ids_from_cu_seqlens(cu, ids.numel())
    sums, counts = segment_logps(logits, labels, segments, cu.numel() - 1, chunk_size=chunk_size)
    chosen, rejected = gather_pairs(sums, pair_index, is_chosen, len(pairs))
    chosen_n, rejected_n = gather_pairs(counts, pair_index, is_chosen, len(pairs))
    return chosen, rejected, chosen_n, rejected_n


def _grads(model: CausalLM) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_packed_equals_unpadded_one_pair_at_a_time(method: str, chunk_size: int | None) -> None:
    model = _model()
    reference = _model(seed=1).eval()
    pairs = _pairs()
    n_pairs = len(pairs)

    def reference_logps() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            rc = torch.stack([_sequence_logp(reference, p, c) for p, c, _ in pairs])
            rr = torch.stack([_sequence_logp(reference, p, r) for p, _, r in pairs])
        return rc, rr

    ref_c, ref_r = reference_logps()

    def loss_of(
        pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        if method in ("dpo", "ipo"):
            loss: DPOLossType = "sigmoid" if method == "dpo" else "ipo"
            smoothing = 0.1 if loss == "sigmoid" else 0.0
            return dpo_loss(
                pc, pr, ref_c[kw["sl"]], ref_r[kw["sl"]], beta=0.5, loss=loss, label_smoothing=smoothing,
                chosen_tokens=nc, rejected_tokens=nr, num_pairs=kw.get("num_pairs"),
            )[0]  # fmt: skip
        if method == "orpo":
            return orpo_loss(
                pc, pr, nc, nr, beta=0.5, num_pairs=kw.get("num_pairs"), num_chosen_tokens=kw.get("tok")
            )[0]
        return simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=0.5, num_pairs=kw.get("num_pairs"))[0]

    # (a) one packed forward over every chosen and rejected segment.
    pc, pr, nc, nr = _packed_logps(model, pairs, chunk_size)
    packed = loss_of(pc, pr, nc, nr, sl=slice(None))
    packed.backward()
    packed_grads = _grads(model)

    # (b) per pair, two separate unpadded forwards; the batch loss is assembled from per-pair terms
    # normalised by the batch totals (pairs, and for ORPO's NLL the chosen tokens), i.e. the mean.
    chosen_tokens = torch.tensor([len(c) for _, c, _ in pairs])
    rejected_tokens = torch.tensor([len(r) for _, _, r in pairs])
    assert nc.tolist() == chosen_tokens.tolist() and nr.tolist() == rejected_tokens.tolist()
    unpadded = torch.zeros(())
    for i, (prompt, good, bad) in enumerate(pairs):
        c = _sequence_logp(model, prompt, good)[None]
        r = _sequence_logp(model, prompt, bad)[None]
        term = loss_of(
            c, r, chosen_tokens[i : i + 1], rejected_tokens[i : i + 1], sl=slice(i, i + 1),
            num_pairs=n_pairs, tok=chosen_tokens.sum(),
        )  # fmt: skip
        term.backward()
        unpadded = unpadded + term.detach()
    unpadded_grads = _grads(model)

    torch.testing.assert_close(packed.detach(), unpadded, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == unpadded_grads.keys() and len(packed_grads) > 0
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, unpadded_grads[name], rtol=1e-5, atol=1e-6, msg=name)
