"""Fused linear cross-entropy (and token log-probs) against the plain ``F.linear`` + ``F.cross_entropy`` path.

Tolerances (fp32): the fused path sums the same products in a different order (per chunk, and the
weight gradient over chunks), so values differ by float rounding only. The loss is a sum of ``N``
terms of size ~log(V): relative 1e-5. A hidden-state gradient sums ``V`` products per element and a
weight-gradient element ``N`` products, each O(1): absolute 1e-6 times that count covers the rounding
(measured errors are ~10x below) while a wrong chunk, a missed row or a wrong mask is off by O(0.1).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core import CausalLM, ModelConfig
from lmstack.train._fused_loss import (
    DEFAULT_CHUNK_BYTES,
    FusedLinearCrossEntropy,
    FusedTokenLogps,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_token_logps,
)
from lmstack.train._preference_losses import token_logps
from lmstack.train.data._errors import TrainConfigError, TrainError

IGNORE = -100


def _inputs(
    n: int, c: int, v: int, *, bias: bool = True, ignore_every: int = 0, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=gen).requires_grad_()
    # Logits of a few units, as a trained head gives: a softmax neither uniform nor one-hot.
    weight = (torch.randn(v, c, generator=gen) / c**0.5 * 2).requires_grad_()
    b = (torch.randn(v, generator=gen) * 0.5).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hidden, weight, b, targets


def _grads(loss: Tensor, *tensors: Tensor | None) -> list[Tensor | None]:
    live = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in tensors]


def _plain(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    return F.cross_entropy(
        F.linear(hidden, weight, bias).float(), targets, reduction="sum", ignore_index=IGNORE
    )


def _assert_matches_plain(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int | None
) -> None:
    n, v = hidden.shape[0], weight.shape[0]
    want = _plain(hidden, weight, bias, targets)
    want_grads = _grads(want, hidden, weight, bias)
    got = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.dim() == 0
    got_grads = _grads(got, hidden, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tolerances = (1e-6 * v, 1e-6 * max(n, 1), 1e-6 * max(n, 1))  # hidden: sums over V; weight, bias: over N
    for g, w, atol in zip(got_grads, want_grads, tolerances, strict=True):
        if w is None:
            assert g is None
        else:
            assert g is not None
            torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------------------------
# equal to the plain path in fp32
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "chunk_size"),
    [
        (64, 4),  # many short chunks
        (64, 64),  # exactly one chunk
        (64, 7),  # chunk size not dividing N (last chunk 1 row)
        (5, 64),  # N smaller than the chunk
        (64, 1),  # one row per chunk
        (64, None),  # the default
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_equal_plain_path(n: int, chunk_size: int | None, bias: bool) -> None:
    hidden, weight, b, targets = _inputs(n, 24, 257, bias=bias, ignore_every=0)
    _assert_matches_plain(hidden, weight, b, targets, chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 16, 100])
def test_ignore_index_rows_carry_no_loss_or_gradient(chunk_size: int) -> None:
    hidden, weight, b, targets = _inputs(50, 16, 300, ignore_every=3)
    _assert_matches_plain(hidden, weight, b, targets, chunk_size)
    g_hidden = _grads(
        fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=chunk_size), hidden
    )
    assert g_hidden[0] is not None
    assert torch.all(g_hidden[0][targets == IGNORE] == 0)
    assert torch.all(g_hidden[0][targets != IGNORE].abs().sum(-1) > 0)


def test_all_rows_ignored_gives_zero() -> None:
    hidden, weight, b, targets = _inputs(9, 8, 40)
    targets[:] = IGNORE
    got = fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=4)
    assert got.item() == 0.0
    for g in _grads(got, hidden, weight, b):
        assert g is not None and torch.all(g == 0)


def test_other_ignore_index() -> None:
    hidden, weight, b, targets = _inputs(20, 8, 40)
    targets[::4] = 7  # a real id, ignored here
    want = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum", ignore_index=7)
    got = fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=3, ignore_index=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(_grads(got, hidden, weight, b), _grads(want, hidden, weight, b), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_no_rows() -> None:
    hidden, weight, b, targets = _inputs(0, 8, 40)
    _assert_matches_plain(hidden, weight, b, targets, 4)
    got = fused_linear_cross_entropy(hidden, weight, targets, bias=b)
    assert got.item() == 0.0
    g_hidden, g_weight, g_bias = _grads(got, hidden, weight, b)
    assert g_hidden is not None and g_hidden.shape == (0, 8)
    assert g_weight is not None and torch.all(g_weight == 0)
    assert g_bias is not None and torch.all(g_bias == 0)


def test_odd_vocabulary() -> None:
    hidden, weight, b, targets = _inputs(45, 32, 1000 + 7, ignore_every=5)
    for chunk_size in (8, None):
        _assert_matches_plain(hidden, weight, b, targets, chunk_size)


def test_backward_scales_by_the_incoming_gradient() -> None:
    hidden, weight, b, targets = _inputs(30, 8, 50)
    want = _grads(_plain(hidden, weight, b, targets) * -0.37, hidden, weight, b)
    got = _grads(
        fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=4) * -0.37, hidden, weight, b
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_gradients_accumulate_into_leaf_grads() -> None:
    hidden, weight, b, targets = _inputs(30, 8, 50)
    _plain(hidden, weight, b, targets).backward()
    _plain(hidden, weight, b, targets).backward()
    want = [t.grad.clone() for t in (hidden, weight, b) if t is not None and t.grad is not None]
    for t in (hidden, weight, b):
        assert t is not None
        t.grad = None
    fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=4).backward()
    fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=4).backward()
    got = [t.grad for t in (hidden, weight, b) if t is not None and t.grad is not None]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_second_backward_is_refused() -> None:
    hidden, weight, b, targets = _inputs(10, 8, 20)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(TrainError, match="one backward per forward"):
        loss.backward()


def test_no_grad_gives_the_loss_only() -> None:
    hidden, weight, b, targets = _inputs(40, 8, 60, ignore_every=4)
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=6)
        want = _plain(hidden, weight, b, targets)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# frozen tensors: no gradient work, nothing saved for them
# ------------------------------------------------------------------------------------------------


def _saved(fn: Callable[[], Tensor]) -> tuple[Tensor, list[tuple[int, ...]], int]:
    """Runs ``fn``, recording what autograd saves: (result, saved shapes, bytes of distinct storages)."""
    shapes: list[tuple[int, ...]] = []
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        shapes.append(tuple(t.shape))
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes, sum(storages.values())


def test_frozen_weight_gets_no_gradient_work() -> None:
    hidden, weight, b, targets = _inputs(40, 16, 200, ignore_every=6)
    weight.requires_grad_(False)
    assert b is not None
    b.requires_grad_(False)
    _assert_matches_plain(hidden, weight, b, targets, 7)
    loss, shapes, _ = _saved(
        lambda: fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=7)
    )
    assert shapes == [(40, 16)]  # the hidden-state gradient only, no [V, C] weight gradient
    loss.backward()
    assert weight.grad is None and b.grad is None and hidden.grad is not None


def test_frozen_hidden_gets_no_hidden_gradient() -> None:
    hidden, weight, b, targets = _inputs(40, 16, 200)
    hidden.requires_grad_(False)
    _assert_matches_plain(hidden, weight, b, targets, 7)
    _, shapes, _ = _saved(lambda: fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=7))
    assert shapes == [(200, 16), (200,)]


def test_fused_path_saves_no_logits() -> None:
    n, c, v = 512, 32, 8192  # N * V * 4 = 16 MiB of fp32 logits; hidden + weight gradients ~1.1 MiB
    hidden, weight, _, targets = _inputs(n, c, v, bias=False)
    fused_loss, fused_shapes, fused_bytes = _saved(
        lambda: fused_linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    )
    plain_loss, plain_shapes, plain_bytes = _saved(lambda: _plain(hidden, weight, None, targets))
    assert fused_bytes < n * v * 4 / 8
    assert not [s for s in fused_shapes if s == (n, v)]
    assert plain_bytes >= n * v * 4  # the check can fail: the plain path does keep [N, V] logits
    assert [s for s in plain_shapes if s == (n, v)]
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# precision: autocast and low-precision inputs
# ------------------------------------------------------------------------------------------------


def test_bf16_autocast_matmul_is_bf16_like_the_plain_path() -> None:
    hidden, weight, b, targets = _inputs(48, 64, 500, ignore_every=5)
    exact = _plain(hidden, weight, b, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(hidden, weight, b, targets)
        got = fused_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=10)
    assert got.dtype == torch.float32
    # bf16 logits move the loss away from fp32; the fused loss moves with the plain one (the same bf16
    # products per logit, the same fp32 softmax), so it is far closer to it than to the fp32 loss.
    assert (want - exact).abs() > 1e-6 * exact.abs()
    assert (got - want).abs() <= 0.05 * (want - exact).abs()
    exact_grads = _grads(exact, hidden, weight, b)
    want_grads = _grads(want, hidden, weight, b)
    got_grads = _grads(got, hidden, weight, b)
    for name, g, w, e, t in zip(
        ("hidden", "weight", "bias"), got_grads, want_grads, exact_grads, (hidden, weight, b), strict=True
    ):
        assert g is not None and w is not None and e is not None and t is not None
        assert g.dtype == t.dtype == torch.float32
        # bf16 operands (8-bit mantissa: ~4e-3 relative per element); the plain path also rounds the
        # weight and bias gradients to bf16 (autocast's cast back), the fused path sums them in fp32.
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item(), msg=name)
        assert (w - e).norm() > 0, name  # bf16 did change the plain gradient: the test sees precision
    # The hidden gradient is the same bf16 matmul per row in both: far closer to each other than to fp32.
    g_h, w_h, e_h = got_grads[0], want_grads[0], exact_grads[0]
    assert g_h is not None and w_h is not None and e_h is not None
    assert (g_h - w_h).norm() <= 0.05 * (w_h - e_h).norm()


def test_bf16_inputs_without_autocast() -> None:
    hidden, weight, b, targets = _inputs(48, 64, 500, ignore_every=5)
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight, b) if t is not None)
    want = _plain(h16, w16, b16, targets)
    got = fused_linear_cross_entropy(h16, w16, targets, bias=b16, chunk_size=10)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # bf16 logits, fp32 softmax: same rounding
    for g, w in zip(_grads(got, h16, w16, b16), _grads(want, h16, w16, b16), strict=True):
        assert g is not None and w is not None and g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.abs().max().item())


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden": torch.zeros(4)}, "hidden must be"),
        ({"hidden": torch.zeros(2, 4, 8)}, "hidden must be"),
        ({"weight": torch.zeros(20, 9)}, "weight must be"),
        ({"weight": torch.zeros(20)}, "weight must be"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, "targets must be"),
        ({"targets": torch.zeros(4)}, "integer token ids"),
        ({"bias": torch.zeros(21)}, "bias must be"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -3}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"targets": torch.tensor([0, 1, 20, 2])}, "outside the vocabulary"),
        ({"targets": torch.tensor([0, -1, 3, 2])}, "outside the vocabulary"),
        ({"weight": torch.zeros(20, 8, dtype=torch.bfloat16)}, "share a dtype"),
        ({"hidden": torch.zeros(4, 8, dtype=torch.long)}, "floating point"),
    ],
)
def test_bad_inputs_are_refused(change: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "hidden": torch.zeros(4, 8),
        "weight": torch.zeros(20, 8),
        "targets": torch.tensor([0, 1, IGNORE, 19]),
        "bias": None,
        "chunk_size": None,
        **change,
    }
    with pytest.raises(TrainConfigError, match=match):
        fused_linear_cross_entropy(
            args["hidden"], args["weight"], args["targets"], bias=args["bias"], chunk_size=args["chunk_size"]
        )
    if "targets" not in change:  # token log-probs take no ignore_index: every target must be an id
        args["targets"] = args["targets"].clamp(min=0)
    with pytest.raises(TrainConfigError, match=match):
        fused_linear_token_logps(
            args["hidden"], args["weight"], args["targets"], bias=args["bias"], chunk_size=args["chunk_size"]
        )


def test_token_logps_refuse_ignore_index() -> None:
    with pytest.raises(TrainConfigError, match="outside the vocabulary"):
        fused_linear_token_logps(torch.zeros(3, 8), torch.zeros(20, 8), torch.tensor([0, IGNORE, 1]))


def test_default_chunk_size() -> None:
    assert default_chunk_size(49152) == DEFAULT_CHUNK_BYTES // (49152 * 4)
    assert default_chunk_size(10**12) == 1
    assert default_chunk_size(1000, budget_bytes=4000 * 7) == 7


# ------------------------------------------------------------------------------------------------
# as CausalLM's output head
# ------------------------------------------------------------------------------------------------


def _tiny_model(vocab: int = 211, tie: bool = True, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    model = CausalLM(config)
    model.reset_parameters(std=0.1)  # larger than the default so the logits are not all ~0
    return model


def _batch(vocab: int, b: int = 3, t: int = 17) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    loss_at = torch.rand(b, t, generator=gen) < 0.6
    indices = loss_at.flatten().nonzero().squeeze(1)
    targets = torch.randint(0, vocab, (indices.numel(),), generator=gen)
    return ids, indices, targets


def _param_grads(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_head_matches_plain_logits(tie: bool) -> None:
    model = _tiny_model(tie=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    ids, indices, targets = _batch(model.config.vocab_size)
    logits = model(ids, logits_indices=indices)
    want = F.cross_entropy(logits.float(), targets, reduction="sum")
    want_grads = _param_grads(model, want)
    head = FusedLinearCrossEntropy(targets, chunk_size=5, min_rows=0)  # fused however few the rows
    got = model(ids, logits_indices=indices, head=head)
    assert head.fused is True
    got_grads = _param_grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    # tied: embed_tokens.weight is the head weight too; its gradient sums the embedding lookups and the head
    assert ("lm_head.weight" in got_grads) is not tie
    for name, g in got_grads.items():
        w = want_grads[name]
        assert w.abs().max() > 0, name  # every gradient compared is a real one
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item(), msg=name)


def test_causal_lm_head_without_logits_indices() -> None:
    model = _tiny_model()
    ids, _, _ = _batch(model.config.vocab_size)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE
    want = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten(), reduction="sum")
    head = FusedLinearCrossEntropy(targets, chunk_size=8)
    got = model(ids, head=head)
    assert head.fused is True
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainConfigError, match="one target per row"):
        model(ids, head=FusedLinearCrossEntropy(targets[:, :-1]))


class _DoubledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: calling it is not F.linear(x, weight, bias)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def _head_loss(lm_head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, bool | None]:
    head = FusedLinearCrossEntropy(targets, chunk_size=3)
    return head(hidden, lm_head), head.fused


def test_head_falls_back_for_a_linear_with_its_own_forward_or_hooks() -> None:
    hidden, _, _, targets = _inputs(20, 8, 30, ignore_every=4)
    doubled = _DoubledLinear(8, 30)
    got, fused = _head_loss(doubled, hidden, targets)
    assert fused is False
    want = F.cross_entropy(2 * F.linear(hidden, doubled.weight, doubled.bias), targets, reduction="sum")
    torch.testing.assert_close(got, want)

    hooked = nn.Linear(8, 30)
    hooked.register_forward_hook(lambda module, args, out: out * 0.5)
    got, fused = _head_loss(hooked, hidden, targets)
    assert fused is False
    torch.testing.assert_close(got, _plain(hidden, hooked.weight * 0.5, hooked.bias * 0.5, targets))

    plain = nn.Linear(8, 30)
    got, fused = _head_loss(plain, hidden, targets)
    assert fused is True
    torch.testing.assert_close(got, _plain(hidden, plain.weight, plain.bias, targets), rtol=1e-5, atol=1e-5)


def _lora() -> Any:
    pytest.importorskip("peft")
    return importlib.import_module("lmstack.train.recipes.lora")


def test_lora_base_head_is_fused_with_a_frozen_weight() -> None:
    lora = _lora()
    model = _tiny_model(tie=False)
    lora.apply_lora(model, lora.LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts B at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert not model.lm_head.weight.requires_grad
    ids, indices, targets = _batch(model.config.vocab_size)
    want = F.cross_entropy(model(ids, logits_indices=indices).float(), targets, reduction="sum")
    want_grads = _param_grads(model, want)
    head = FusedLinearCrossEntropy(targets, chunk_size=4, min_rows=0)  # fused however few the rows
    got = model(ids, logits_indices=indices, head=head)
    assert head.fused is True
    got_grads = _param_grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads and all("lora_" in n for n in got_grads)
    for name, g in got_grads.items():
        torch.testing.assert_close(
            g, want_grads[name], rtol=1e-4, atol=1e-5 * want_grads[name].abs().max().item()
        )


def test_lora_adapted_head_falls_back() -> None:
    lora = _lora()
    model = _tiny_model(tie=False)
    lora.apply_lora(model, lora.LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, indices, targets = _batch(model.config.vocab_size)
    want = F.cross_entropy(model(ids, logits_indices=indices).float(), targets, reduction="sum")
    want_grads = _param_grads(model, want)
    head = FusedLinearCrossEntropy(targets)
    got = model(ids, logits_indices=indices, head=head)
    assert head.fused is False  # peft's lora.Linear adds B @ A x: not the base weight alone
    torch.testing.assert_close(got, want)
    for name, g in _param_grads(model, got).items():
        torch.testing.assert_close(g, want_grads[name])


def test_4bit_head_falls_back() -> None:
    lora = _lora()
    pytest.importorskip("bitsandbytes")
    model = _tiny_model(tie=False)
    settings = lora.LoRASettings(quantize="nf4", target_modules=["lm_head"])
    lora._quantize_linears(model, ["lm_head"], settings, torch.device("cpu"))
    assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is not nn.Linear  # a subclass
    ids, indices, targets = _batch(model.config.vocab_size)
    want = F.cross_entropy(model(ids, logits_indices=indices).float(), targets, reduction="sum")
    want_grads = _param_grads(model, want)
    head = FusedLinearCrossEntropy(targets)
    got = model(ids, logits_indices=indices, head=head)
    assert head.fused is False  # its weight is packed 4-bit codes: F.linear on it would be garbage
    torch.testing.assert_close(got, want)
    for name, g in _param_grads(model, got).items():
        torch.testing.assert_close(g, want_grads[name])


# ------------------------------------------------------------------------------------------------
# per-token log-probs
# ------------------------------------------------------------------------------------------------


def _plain_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    return token_logps(F.linear(hidden, weight, bias), targets)


@pytest.mark.parametrize(("n", "chunk_size"), [(40, 3), (40, 40), (40, 9), (4, 64), (0, 8), (40, None)])
def test_token_logps_equal_plain_path(n: int, chunk_size: int | None) -> None:
    hidden, weight, b, targets = _inputs(n, 16, 333)
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(5))
    want = _plain_logps(hidden, weight, b, targets)
    got = fused_linear_token_logps(hidden, weight, targets, bias=b, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_grads = _grads((want * grad_out).sum(), hidden, weight, b)
    got_grads = _grads((got * grad_out).sum(), hidden, weight, b)
    for g, w, atol in zip(got_grads, want_grads, (333e-6, 1e-6 * max(n, 1), 1e-6 * max(n, 1)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)


def test_token_logps_save_no_logits_and_skip_frozen_weight() -> None:
    n, v = 256, 4096
    hidden, weight, _, targets = _inputs(n, 16, v, bias=False)
    weight.requires_grad_(False)
    got, shapes, nbytes = _saved(lambda: fused_linear_token_logps(hidden, weight, targets, chunk_size=32))
    assert nbytes < n * v * 4 / 8 and (n, v) not in shapes
    got.sum().backward()
    assert weight.grad is None
    want = _plain_logps(hidden.detach().requires_grad_(), weight, None, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, None])
def test_token_logps_with_a_frozen_head(chunk_size: int | None) -> None:
    hidden, weight, b, targets = _inputs(30, 16, 333)
    assert b is not None
    weight.requires_grad_(False)
    b.requires_grad_(False)
    grad_out = torch.randn(30, generator=torch.Generator().manual_seed(6))
    want = _plain_logps(hidden, weight, b, targets)
    got, shapes, _ = _saved(
        lambda: fused_linear_token_logps(hidden, weight, targets, bias=b, chunk_size=chunk_size)
    )
    assert shapes == [(30, 16)]  # the per-row gradient of hidden: backward needs no recompute
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g,) = _grads((got * grad_out).sum(), hidden)
    (w,) = _grads((want * grad_out).sum(), hidden)
    torch.testing.assert_close(g, w, rtol=1e-5, atol=333e-6)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_token_logps_under_bf16_autocast(frozen_head: bool) -> None:
    hidden, weight, b, targets = _inputs(30, 64, 300)
    assert b is not None
    weight.requires_grad_(not frozen_head)
    b.requires_grad_(not frozen_head)
    exact = _plain_logps(hidden, weight, b, targets).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain_logps(hidden, weight, b, targets)
        got = fused_linear_token_logps(hidden, weight, targets, bias=b, chunk_size=7)
    assert (want - exact).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * (want - exact).abs().max().item() + 1e-6)
    grad_out = torch.randn(30, generator=torch.Generator().manual_seed(3))
    for g, w in zip(
        _grads((got * grad_out).sum(), hidden, weight, b),
        _grads((want * grad_out).sum(), hidden, weight, b),
        strict=True,
    ):
        assert (g is None) == (w is None) and (w is not None or frozen_head)
        if g is not None and w is not None:
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


@pytest.mark.parametrize("adapted_head", [False, True])
def test_token_logps_head_through_causal_lm(adapted_head: bool) -> None:
    model = _tiny_model(tie=not adapted_head)
    if adapted_head:  # peft's LoRA layer on the head: the plain path must run
        lora = _lora()
        lora.apply_lora(model, lora.LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["lm_head"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids, indices, targets = _batch(model.config.vocab_size)
    grad_out = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(2))
    want = token_logps(model(ids, logits_indices=indices), targets)
    want_grads = _param_grads(model, (want * grad_out).sum())
    head = FusedTokenLogps(targets, chunk_size=6)
    got = model(ids, logits_indices=indices, head=head)
    assert head.fused is not adapted_head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_grads = _param_grads(model, (got * grad_out).sum())
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        w = want_grads[name]
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item(), msg=name)
    with pytest.raises(TrainConfigError, match="one target per selected row"):
        model(ids, logits_indices=indices, head=FusedTokenLogps(targets[1:]))


def test_head_keeps_the_plain_path_for_few_rows() -> None:
    # Fewer rows than half the hidden size: the plain path's [N, V] logits are smaller than the fused
    # path's [V, C] weight gradient, so the head does not fuse (same loss either way).
    hidden, _, _, targets = _inputs(6, 32, 50, ignore_every=4)
    linear = nn.Linear(32, 50)
    few = FusedLinearCrossEntropy(targets)
    got = few(hidden, linear)
    assert few.fused is False
    torch.testing.assert_close(got, _plain(hidden, linear.weight, linear.bias, targets), rtol=1e-5, atol=1e-5)
    forced = FusedLinearCrossEntropy(targets, min_rows=6)
    torch.testing.assert_close(forced(hidden, linear), got, rtol=1e-5, atol=1e-5)
    assert forced.fused is True
