"""One varlen attention call per layer: every PackedAttention implementation against the reference.

The reference (``impl="sdpa"``) runs one causal SDPA per sample; the tests that pack whole models
(test_attention.py) compare packed logits with each sample run alone through dense attention.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lmstack.core import CausalLM, LMStackError, ModelConfig, PackedAttention
from lmstack.core.model._varlen import padded_cu_seqlens

# Odd sample lengths, a one-token sample and one long one.
LENGTHS = [7, 1, 33, 5, 130, 2]


def _qkv(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, grad: bool = True
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    n = sum(LENGTHS)
    shapes = ((1, n, heads, dim), (1, n, kv_heads, dim), (1, n, kv_heads, dim))
    return tuple(torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes)


def _cu() -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _run(
    impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> list[torch.Tensor]:
    out = PackedAttention(_cu(), impl=impl).attend(0, q, k, v, scale=0.3, window=window)  # type: ignore[arg-type]
    # A weighted sum, so that every output element gets its own gradient.
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    return [out, *grads]


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (6, 2, 32), (8, 2, 24), (3, 1, 64)])
@pytest.mark.parametrize("window", [None, 9])
def test_varlen_equals_per_sample_reference_fp32(
    heads: int, kv_heads: int, dim: int, window: int | None
) -> None:
    q, k, v = _qkv(heads, kv_heads, dim, torch.float32)
    ours, ref = _run("varlen", q, k, v, window), _run("sdpa", q, k, v, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        # Both run torch's CPU flash kernels on the same spans; only the reference's SDPA dispatch differs.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_half_precision(dtype: torch.dtype) -> None:
    q, k, v = _qkv(6, 2, 32, dtype)
    ours, ref = _run("varlen", q, k, v, None), _run("sdpa", q, k, v, None)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == dtype
        # Same kernels in the same precision: equal up to a unit in the last place of the 8/11-bit mantissa.
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("window", [None, 9])
def test_flex_forward_on_cpu_equals_reference(window: int | None) -> None:
    # FlexAttention has no CPU backward in torch 2.13: its forward (evaluation, reference passes) is
    # checked here, its backward by the GPU test below.
    q, k, v = _qkv(6, 2, 32, torch.float32, grad=False)
    with torch.no_grad():
        flex = PackedAttention(_cu(), impl="flex").attend(0, q, k, v, scale=0.3, window=window)
        ref = PackedAttention(_cu(), impl="sdpa").attend(0, q, k, v, scale=0.3, window=window)
    # Compiled flex sums keys in blocks in another order than the flash kernel: fp32 rounding only.
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=2e-5)


def test_auto_picks_varlen_on_cpu_and_host_boundaries_are_used() -> None:
    q, _, _ = _qkv(2, 2, 8, torch.float32, grad=False)
    attn = PackedAttention(_cu())
    assert attn.resolve(q) == "varlen"
    # Device boundaries with a host copy: the host copy is what is checked and read.
    attn = PackedAttention(_cu().to(torch.int32), host_cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(LMStackError, match="covers 5 tokens"):
        attn.attend(0, q, q, q, scale=1.0, window=None)


def test_unknown_impl_and_padded_boundaries() -> None:
    with pytest.raises(LMStackError, match="unknown PackedAttention impl"):
        PackedAttention(_cu(), impl="fast")  # type: ignore[arg-type]
    padded = padded_cu_seqlens(torch.tensor([0, 3, 7]), 7)
    assert padded.tolist() == [0, 3, 7, 7, 7, 7, 7, 7]


def _tiny() -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return CausalLM(config)


def _packing(seed: int, total: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(1, 40, (1,), generator=g)), total - sum(lengths)))
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_compiled_layers_match_eager_and_never_recompile() -> None:
    eager, compiled = _tiny(), _tiny()
    for layer in compiled.model.layers:
        layer.compile()
    counters.clear()
    graphs = []
    for step in range(4):  # a different packing every step, same bin shape
        positions = _packing(step)
        ids = torch.randint(0, 97, positions.shape, generator=torch.Generator().manual_seed(step))
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(ids, positions, PackedAttention.from_positions(positions)).logsumexp(-1).sum()
            loss.backward()
            losses.append(loss)
        # Inductor fuses the norms, RoPE and SwiGLU; sums then round differently in fp32.
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    # The decoder layers share one graph (forward and backward), compiled on the first step only.
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 4, graphs


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flex", "flash"])
def test_gpu_varlen_backward_equals_reference(impl: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl == "flash":
        from lmstack.core.model import flash_attn_available

        if not flash_attn_available():
            pytest.skip("flash-attn is not installed")
    q, k, v = (t.detach().cuda().to(torch.bfloat16).requires_grad_() for t in _qkv(8, 2, 64, torch.float32))
    ours, ref = _run(impl, q, k, v, None), _run("sdpa", q, k, v, None)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        # bf16 kernels that tile differently: a few units in the last place of bf16's 8-bit mantissa.
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"model_type": "mistral", "sliding_window": 5}, {"qkv_bias": True, "num_key_value_heads": 1}],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_on_logits_rows_equals_full_layer(
    overrides: dict[str, object], checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmstack.core.model._transformer as transformer

    config = ModelConfig(
        **{
            "model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, **overrides,
        }
    )  # fmt: skip
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).reshape(2, -1)  # 178 tokens, 2 rows
    ids = torch.randint(0, 97, positions.shape, generator=torch.Generator().manual_seed(2))
    # About a third of the tokens carry loss, one-token samples and sample ends included.
    pick = torch.rand(positions.numel(), generator=torch.Generator().manual_seed(3)) < 0.3
    indices = torch.nonzero(pick).flatten()
    spy = {"rows": 0}
    original = PackedAttention.attend_rows

    def counted(self: PackedAttention, *args: object, **kwargs: object) -> torch.Tensor:
        spy["rows"] += 1
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(PackedAttention, "attend_rows", counted)
    results = []
    for share in (0.5, -1.0):  # the rows path, then the full last layer
        monkeypatch.setattr(transformer, "ROWS_ONLY_MAX_SHARE", share)
        torch.manual_seed(0)
        model = CausalLM(config)
        model.enable_activation_checkpointing(checkpointing)
        logits = model(ids, positions, PackedAttention.from_positions(positions), logits_indices=indices)
        (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    # The first pass took the rows path (the last layer; again in backward when checkpointed), the second not.
    assert spy["rows"] == (2 if checkpointing else 1)
    (rows_logits, rows_grads), (full_logits, full_grads) = results
    # The same arithmetic on fewer rows; attention of a row runs as a masked SDPA instead of the
    # causal kernel: fp32 rounding only.
    torch.testing.assert_close(rows_logits, full_logits, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_rows_path_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny()
    positions = _packing(0)
    packed = PackedAttention.from_positions(positions)
    assert model._rows_only(packed, torch.tensor([3, 9, 40]), positions.numel())
    assert not model._rows_only(packed, torch.tensor([9, 3]), positions.numel())  # not ascending
    assert not model._rows_only(packed, torch.arange(60), positions.numel())  # most tokens: full layer
    assert not model._rows_only(packed, torch.arange(0), positions.numel())  # no row: nothing to gain
    from lmstack.core import DenseAttention

    assert not model._rows_only(DenseAttention(), torch.tensor([3]), positions.numel())  # no attend_rows
    compiled = _tiny()
    compiled.model.layers[-1].compile()  # rows of a new count every batch would recompile it
    assert not compiled._rows_only(packed, torch.tensor([3, 9, 40]), positions.numel())
    # Unsorted logits_indices still come back in the order asked.
    ids = torch.randint(0, 97, positions.shape)
    with torch.no_grad():
        full = model(ids, positions, packed)[0]
        picked = model(ids, positions, packed, logits_indices=torch.tensor([40, 3, 9]))
    torch.testing.assert_close(picked, full[[40, 3, 9]], rtol=1e-5, atol=1e-6)
