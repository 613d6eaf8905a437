"""Sequence parallelism (Ulysses all-to-all and ring attention) against the single-process reference.

One torchrun launch of 4 CPU ranks (gloo) runs every distributed case, at sp=4 (one group) and at
sp=2 (two groups of 2, whose P2P peers are not their global ranks), see parallel_cases/sequence_cases.py.
The reference is core's PackedAttention ``impl="sdpa"`` (one causal SDPA per sample) on the full
batch in this process, and for whole-model cases the same CausalLM on the full batch.

Tolerances (fp32; measured worst error 2.4e-6 everywhere): Ulysses runs the varlen kernel on exactly
the reference's samples, differing only in kernel dispatch (1e-5). Ring attention merges per-block
softmaxes by log-sum-exp and sums gradient contributions block by block around the ring, another
summation order: 2e-5 on O(1) values. Model gradients (up to ~7) are sums over 80 tokens and over
ranks (all-reduce order): 1e-5 relative plus 2e-5 absolute; the summed loss (~316) to 1e-5 relative.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _torchrun import torchrun

from lmstack.core import CausalLM, ConfigError, LMStackError, ModelConfig, PackedAttention
from lmstack.core.parallel._ring import RingAttention, _build_plan
from lmstack.core.parallel._sequence import (
    SequenceGroup,
    SequenceLayout,
    UlyssesAttention,
    next_token_targets,
    sequence_chunks,
    sequence_token_index,
    shard_sequence,
    unshard_sequence,
)

CASES_SCRIPT = Path(__file__).parent / "parallel_cases" / "sequence_cases.py"
WORLD = 4
B, T = 2, 40  # T/(2*sp) = 5 tokens per zigzag chunk at sp=4: odd, and samples cross every boundary
# Flat over the B*T = 80 tokens: many short samples, a 13-token one across the row end, a long one
# of 31 tokens spanning slices on every layout, and odd lengths throughout.
LENGTHS = [3, 1, 4, 1, 5, 9, 2, 6, 13, 31, 5]
CU = torch.tensor([0, *itertools.accumulate(LENGTHS)])
LAYOUTS: tuple[SequenceLayout, ...] = ("contiguous", "zigzag")
WINDOW = 7
SCALE = 0.31

ATTENTION_CASES: list[dict[str, Any]] = [
    {"kind": "attention", "sp": sp, "backend": backend, "layout": layout, "heads": heads, "window": window}
    for sp in (2, 4)
    for backend in ("ulysses", "ring")
    for layout in LAYOUTS
    for heads in ((8, 2), (6, 2))
    for window in (None, WINDOW)
] + [
    # Uneven local grouping: at sp=2, rank 0 gets q heads 0-4 over kv heads 0 (three) and 1 (two),
    # so its kv heads are repeated locally; at sp=4 with 3 query heads one rank gets none.
    {"kind": "attention", "sp": sp, "backend": backend, "layout": layout, "heads": heads, "window": window}
    for backend in ("ulysses", "ring")
    for sp, layout, heads, window in ((2, "zigzag", (9, 3), WINDOW), (4, "contiguous", (3, 1), None))
]
MODEL_CASES: list[dict[str, Any]] = [
    {"kind": "model", "sp": sp, "backend": backend, "layout": layout, "checkpointing": False}
    for sp in (2, 4)
    for backend in ("ulysses", "ring")
    for layout in LAYOUTS
] + [
    # Activation checkpointing reruns each layer's forward, collectives included, during backward.
    {"kind": "model", "sp": 4, "backend": backend, "layout": "zigzag", "checkpointing": True}
    for backend in ("ulysses", "ring")
]
# Query heads 6 over kv heads 2 (uneven over sp=4), qkv bias, a sliding-window layer then a full one.
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 68,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "sliding_window": 6,
    "layer_types": ("sliding_attention", "full_attention"),
}


def _named(name: str) -> Callable[[str], str]:
    return lambda message: f"{name}: {message}"


def _case_id(case: dict[str, Any]) -> str:
    parts = [f"sp{case['sp']}", case["backend"], case["layout"]]
    if case["kind"] == "attention":
        parts += [f"h{case['heads'][0]}kv{case['heads'][1]}", f"w{case['window']}"]
    elif case["checkpointing"]:
        parts.append("checkpointed")
    return "-".join(parts)


def _positions() -> torch.Tensor:
    """Per-sample positions of the flat tokens (restart at 0 for every sample), as [B, T]."""
    return torch.cat([torch.arange(n) for n in LENGTHS]).reshape(B, T)


def _model() -> CausalLM:
    torch.manual_seed(3)
    model = CausalLM(ModelConfig(**MODEL_CONFIG))
    with torch.no_grad():  # random biases and norms, so a misplaced one cannot hide behind 0 or 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model


def _materialise(index: int, case: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + index)
    full = dict(case, cu=CU.clone())
    if case["kind"] == "attention":
        hq, hkv = case["heads"]
        full.update(
            q=torch.randn(B, T, hq, 8, generator=g),
            k=torch.randn(B, T, hkv, 8, generator=g),
            v=torch.randn(B, T, hkv, 8, generator=g),
            dout=torch.randn(B, T, hq, 8, generator=g),
            scale=SCALE,
            # Ring: odd pieces that do not divide the slices, or the default (whole runs at this size).
            block_size=3 if case["window"] is None else None,
        )
    else:
        ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (B, T), generator=g)
        full.update(
            config=MODEL_CONFIG,
            state=_model().state_dict(),
            ids=ids,
            positions=_positions(),
            targets=next_token_targets(ids, cu_seqlens=CU),
            block_size=4,
        )
    return full


@pytest.fixture(scope="module")
def distributed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every case under one torchrun launch; returns the materialised cases and each rank's results."""
    out = tmp_path_factory.mktemp("sequence")
    cases = [_materialise(i, c) for i, c in enumerate(ATTENTION_CASES + MODEL_CASES)]
    torch.save(cases, out / "cases.pt")
    torchrun(CASES_SCRIPT, WORLD, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return cases, ranks


def _groups(ranks: list[dict[str, Any]], sp: int) -> list[list[int]]:
    """The global ranks of each sp group, ordered by sp rank."""
    groups: dict[int, dict[int, int]] = {}
    for r, saved in enumerate(ranks):
        dp, sp_rank = saved["coords"][sp]
        groups.setdefault(dp, {})[sp_rank] = r
    assert len(groups) == WORLD // sp and all(len(g) == sp for g in groups.values())
    return [[g[i] for i in range(sp)] for g in groups.values()]


def _reference_attention(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = PackedAttention(CU, impl="sdpa").attend(0, q, k, v, scale=case["scale"], window=case["window"])
    dq, dk, dv = torch.autograd.grad((out * case["dout"]).sum(), (q, k, v))
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.parametrize("index", range(len(ATTENTION_CASES)), ids=[_case_id(c) for c in ATTENTION_CASES])
def test_backend_matches_packed_reference(distributed: Any, index: int) -> None:
    cases, ranks = distributed
    case = cases[index]
    ref = _reference_attention(case)
    tol = 1e-5 if case["backend"] == "ulysses" else 2e-5
    for group in _groups(ranks, case["sp"]):
        for name, expected in ref.items():
            shards = [ranks[r]["results"][index][name] for r in group]
            got = unshard_sequence(shards, layout=case["layout"])
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=_named(name))


@pytest.mark.parametrize("index", range(len(MODEL_CASES)), ids=[_case_id(c) for c in MODEL_CASES])
def test_model_loss_and_gradients_match_full_batch(distributed: Any, index: int) -> None:
    cases, ranks = distributed
    case = cases[len(ATTENTION_CASES) + index]
    model = _model()
    logits = model(case["ids"], case["positions"], PackedAttention(CU, impl="sdpa"))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), case["targets"].reshape(-1), reduction="sum")
    loss.backward()
    for saved in ranks:
        got = saved["results"][len(ATTENTION_CASES) + index]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=2e-5, msg=_named(name))


def test_gather_sequence_rebuilds_the_full_tensor_on_every_rank(distributed: Any) -> None:
    _, ranks = distributed
    for saved in ranks:
        assert saved["gathered"] and all(saved["gathered"].values()), saved["gathered"]


# -- in-process: slicing, targets, balance, the single-rank backends ------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout: SequenceLayout, sp: int) -> None:
    t = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [shard_sequence(t, r, sp, layout=layout) for r in range(sp)]
    assert all(s.shape == (2, 24 // sp, 3) for s in shards)
    torch.testing.assert_close(unshard_sequence(shards, layout=layout), t)
    # Every token exactly once.
    assert sorted(torch.cat([s[:, :, 0].flatten() for s in shards]).tolist()) == t[:, :, 0].flatten().tolist()
    # Along another dim too.
    shards0 = [shard_sequence(t.transpose(0, 1), r, sp, dim=0, layout=layout) for r in range(sp)]
    torch.testing.assert_close(unshard_sequence(shards0, dim=0, layout=layout), t.transpose(0, 1))


def test_zigzag_chunks() -> None:
    assert sequence_chunks(16, 0, 2, layout="zigzag") == [(0, 4), (12, 16)]
    assert sequence_chunks(16, 1, 2, layout="zigzag") == [(4, 8), (8, 12)]
    assert sequence_chunks(16, 1, 2) == [(8, 16)]


def test_shard_errors_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):
        shard_sequence(torch.zeros(1, 10), 0, 4)
    with pytest.raises(ConfigError, match="multiple of 8"):
        shard_sequence(torch.zeros(1, 12), 0, 4, layout="zigzag")
    with pytest.raises(ConfigError, match="out of range"):
        shard_sequence(torch.zeros(1, 8), 2, 2)
    with pytest.raises(ConfigError, match="unknown sequence layout"):
        shard_sequence(torch.zeros(1, 8), 0, 2, layout="striped")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown sequence layout"):
        UlyssesAttention(CU, layout="striped")  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sp", [1, 3])
def test_token_index_is_the_flat_index_of_local_tokens(layout: SequenceLayout, sp: int) -> None:
    flat = torch.arange(3 * 24).reshape(3, 24)
    for r in range(sp):
        local = shard_sequence(flat, r, sp, layout=layout)
        assert sequence_token_index(3, 24, r, sp, layout=layout).tolist() == local.flatten().tolist()


def test_next_token_targets_shift_across_slices_not_samples() -> None:
    ids = torch.arange(10, 10 + B * T).reshape(B, T)
    targets = next_token_targets(ids, cu_seqlens=CU)
    flat = targets.flatten()
    ends = set((CU[1:] - 1).tolist())
    for i in range(B * T):
        assert flat[i] == (-100 if i in ends else 10 + i + 1)
    # The 13-token sample crossing the row end keeps its target at the end of row 0.
    assert targets[0, -1] == ids[1, 0]
    # Rows alone: the last column predicts nothing.
    rows = next_token_targets(ids)
    assert rows[:, -1].tolist() == [-100, -100] and rows[0, :-1].tolist() == ids[0, 1:].tolist()
    # The shifted targets, sharded, are what each rank's positions predict.
    shards = [shard_sequence(targets, r, 4, layout="zigzag") for r in range(4)]
    assert shards[0][0, 4] == ids[0, 5]  # last token of chunk 0 predicts the first of chunk 1 (rank 1's)
    with pytest.raises(ConfigError, match="covers"):
        next_token_targets(ids, cu_seqlens=torch.tensor([0, 5, 70]))


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_zigzag_balances_causal_work(sp: int) -> None:
    """Visible query-key pairs per rank for one causal sequence per row (measured by counting)."""
    seq = 16 * sp
    work = {}
    for layout in LAYOUTS:
        # A query at position p of its sample sees p + 1 keys: one sample per row here.
        work[layout] = [
            int((sequence_token_index(2, seq, r, sp, layout=layout) % seq + 1).sum()) for r in range(sp)
        ]
    c = seq // (2 * sp)
    assert work["zigzag"] == [2 * ((2 * sp - 1) * c * c + c * (c + 1))] * sp
    assert sum(work["zigzag"]) == sum(work["contiguous"])
    # Contiguous slices of L = 2c tokens: rank r sees r·L² + L(L+1)/2 pairs a row, ~(2r + 1) : 1.
    length = 2 * c
    assert work["contiguous"] == [2 * (r * length * length + length * (length + 1) // 2) for r in range(sp)]
    assert max(work["contiguous"]) / min(work["contiguous"]) > 0.9 * (2 * sp - 1)


def test_ring_plan_skips_fully_masked_blocks() -> None:
    """Contiguous slices of one sample per row: rank 0 skips every block after its own."""
    cu = torch.tensor([0, 32, 64])
    counts = {}
    for layout in LAYOUTS:
        for r in range(4):
            plan = _build_plan(
                cu, SequenceGroup(None, r, 4), 2, 8, layout, None, 512, 1.0, torch.device("cpu")
            )
            counts[layout, r] = [len(p) for p in plan.steps]
    assert counts["contiguous", 0] == [2, 0, 0, 0]  # its own slice of each row, then only future keys
    assert counts["contiguous", 3] == [2, 2, 2, 2]
    # Zigzag: the early chunk skips later slices, the late chunk never does.
    assert all(c > 0 for r in range(4) for c in counts["zigzag", r])
    # A window of 2 tokens leaves only the own slice and its predecessor's.
    plan = _build_plan(cu, SequenceGroup(None, 2, 4), 2, 8, "contiguous", 2, 512, 1.0, torch.device("cpu"))
    assert [len(p) for p in plan.steps] == [2, 2, 0, 0]


@pytest.mark.parametrize("window", [None, 1, WINDOW])
@pytest.mark.parametrize("heads", [(8, 2), (6, 2), (3, 3)])
def test_single_process_backends_match_reference(heads: tuple[int, int], window: int | None) -> None:
    """Without a process group both backends attend locally; ring exercises its block kernels."""
    g = torch.Generator().manual_seed(7)
    hq, hkv = heads
    q, k, v = (torch.randn(B, T, h, 8, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    dout = torch.randn(B, T, hq, 8, generator=g)
    ref = PackedAttention(CU, impl="sdpa").attend(0, q, k, v, scale=SCALE, window=window)
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    backends: list[Any] = [
        UlyssesAttention(CU),
        *(RingAttention(CU, block_size=b) for b in (None, 512, 5, 1)),
    ]
    for backend in backends:
        out = backend.attend(0, q, k, v, scale=SCALE, window=window)
        grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
        for a, b in zip((out, *grads), (ref, *ref_grads), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_ring_accumulates_half_precision_in_fp32() -> None:
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(B, T, h, 8, generator=g) for h in (6, 2, 2))
    ref = PackedAttention(CU, impl="sdpa").attend(0, q, k, v, scale=SCALE, window=None)
    half = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = RingAttention(CU, block_size=4).attend(0, *half, scale=SCALE, window=None)
    assert out.dtype == torch.bfloat16
    # bf16 inputs (8-bit mantissa): the error is the inputs' rounding, not the accumulation.
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in half)


def test_backends_reject_a_batch_cu_seqlens_does_not_cover() -> None:
    q = torch.randn(1, 40, 4, 8)
    for backend in (UlyssesAttention(CU), RingAttention(CU)):
        with pytest.raises(LMStackError, match="cu_seqlens covers 80 tokens"):
            backend.attend(0, q, q, q, scale=1.0, window=None)
    with pytest.raises(LMStackError, match="strictly increasing"):
        RingAttention(torch.tensor([0, 5, 5, 9]))


def test_model_runs_with_ring_in_one_process() -> None:
    """The whole model through RingAttention (sp=1) equals the packed reference, no seam changed."""
    model = _model()
    ids = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(4))
    ref = model(ids, _positions(), PackedAttention(CU, impl="sdpa"))
    got = model(ids, _positions(), RingAttention(CU, block_size=7))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
