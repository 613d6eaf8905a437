"""Attention backends: packed varlen attention equals running each sample alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, DenseAttention, LMStackError, ModelConfig, PackedAttention
from lmstack.core.model import AttentionBackend


def _model(tiny_config: Any, **overrides: Any) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_dict(tiny_config(**overrides))).eval()


def _samples(lengths: list[int], vocab: int = 97) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _pack(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    return ids, positions


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model_type": "mistral", "sliding_window": 4},
        {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}},
    ],
)
def test_packed_logits_equal_each_sample_alone(tiny_config: Any, overrides: dict[str, Any]) -> None:
    model = _model(tiny_config, **overrides)
    samples = _samples([7, 1, 12, 5])
    ids, positions = _pack(samples)
    with torch.no_grad():
        packed = model(ids, positions, PackedAttention.from_positions(positions))[0]
        alone = torch.cat([model(s[None])[0] for s in samples])
    assert (packed - alone).abs().max() <= 1e-5


def test_packed_dynamic_ntk_uses_each_samples_length(tiny_config: Any) -> None:
    model = _model(
        tiny_config, max_position_embeddings=6, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    samples = _samples([9, 4, 13])
    ids, positions = _pack(samples)
    seq_lens = torch.cat([torch.full((len(s),), len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = model(ids, positions, PackedAttention.from_positions(positions), rope_seq_lens=seq_lens)[0]
        alone = torch.cat([model(s[None])[0] for s in samples])
    assert (packed - alone).abs().max() <= 1e-5


def test_packed_gradients_equal_unpacked(tiny_config: Any) -> None:
    model = _model(tiny_config).train()
    samples = _samples([6, 11, 3])
    ids, positions = _pack(samples)
    loss = model(ids, positions, PackedAttention.from_positions(positions)).logsumexp(-1).sum()
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(s[None]).logsumexp(-1).sum() for s in samples).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_rows_in_a_batch(tiny_config: Any) -> None:
    model = _model(tiny_config)
    rows = [_samples([3, 5]), _samples([8])]
    ids = torch.stack([_pack(r)[0][0] for r in rows])
    positions = torch.stack([_pack(r)[1][0] for r in rows])
    attn = PackedAttention.from_positions(positions)
    assert attn.cu_seqlens.tolist() == [0, 3, 8, 16]
    with torch.no_grad():
        packed = model(ids, positions, attn)
        alone = torch.cat([model(s[None])[0] for r in rows for s in r])
    assert (packed.reshape(-1, 97) - alone).abs().max() <= 1e-5


def test_packed_attention_rejects_bad_boundaries() -> None:
    with pytest.raises(LMStackError, match="strictly increasing"):
        PackedAttention(torch.tensor([0, 3, 3, 5]))
    with pytest.raises(LMStackError, match="1-D"):
        PackedAttention(torch.tensor([1, 3]))
    attn = PackedAttention(torch.tensor([0, 4]))
    q = torch.zeros(1, 5, 2, 4)
    with pytest.raises(LMStackError, match="covers 4 tokens but the batch holds 5"):
        attn.attend(0, q, q, q, scale=0.5, window=None)


def test_backends_satisfy_the_protocol() -> None:
    assert isinstance(DenseAttention(), AttentionBackend)
    assert isinstance(PackedAttention(torch.tensor([0, 2])), AttentionBackend)


def test_custom_backend_sees_every_layer(tiny_config: Any) -> None:
    """The extension point lmstack-infer's paged cache uses: a backend gets (layer, q, k, v)."""

    class Recording:
        def __init__(self) -> None:
            self.calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
            self.inner = DenseAttention()

        def attend(self, layer_idx: int, q: Any, k: Any, v: Any, *, scale: float, window: int | None) -> Any:
            self.calls.append((layer_idx, tuple(q.shape), tuple(k.shape)))
            return self.inner.attend(layer_idx, q, k, v, scale=scale, window=window)

    model = _model(tiny_config)
    rec = Recording()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn=rec), model(ids))
    assert rec.calls == [(0, (2, 5, 6, 8), (2, 5, 2, 8)), (1, (2, 5, 6, 8), (2, 5, 2, 8))]


def test_activation_checkpointing_same_gradients(tiny_config: Any) -> None:
    model = _model(tiny_config).train()
    ids = torch.randint(0, 97, (2, 9))
    model(ids).logsumexp(-1).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_activation_checkpointing()
    model(ids).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(plain[name], p.grad, msg=name)


def test_tensor_parallel_plan_covers_every_linear(tiny_config: Any) -> None:
    import fnmatch

    model = _model(tiny_config)
    plan = model.tp_plan()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            styles = [style for pattern, style in plan.items() if fnmatch.fnmatch(name, pattern)]
            assert len(styles) == 1 and styles[0] in ("colwise", "rowwise"), name
