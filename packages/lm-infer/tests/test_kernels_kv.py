"""KV-cache write kernel and KV quantization, in Triton's CPU interpreter against torch references."""

from __future__ import annotations

import pytest
import torch

from lmstack.infer import InferError
from lmstack.infer.kernels import (
    KernelUnavailableError,
    PagedKV,
    QuantizedKVLayout,
    dequantize_kv,
    quantize_kv,
    triton_available,
    write_kv,
    write_kv_torch,
)

# Not importorskip: importing triton here, before the fixture below sets TRITON_INTERPRET, would
# wrap triton's standard library for the compiler.
pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (lmstack-infer[kernels])")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run the kernels in Triton's CPU interpreter. Importing lmstack.infer.kernels does not import
    # triton (the first launch does), so setting the variable here, before the first launch, suffices.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _float_cache(slots: int, heads: int, dim: int, dtype: torch.dtype) -> PagedKV:
    return PagedKV(torch.zeros(slots, heads, dim, dtype=dtype), torch.zeros(slots, heads, dim, dtype=dtype))


def _tensors(cache: PagedKV) -> list[torch.Tensor]:
    return [
        t
        for t in (cache.keys, cache.values, cache.k_scales, cache.k_zeros, cache.v_scales, cache.v_zeros)
        if t is not None
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "dim"), [(1, 40), (3, 64)])
def test_write_float_cache(dtype: torch.dtype, heads: int, dim: int) -> None:
    torch.manual_seed(0)
    slots = torch.tensor([5, 9, -1, 33, 0, 63, 12])
    k, v = torch.randn(7, heads, dim).to(dtype), torch.randn(7, heads, dim).to(dtype)
    triton_cache, torch_cache = _float_cache(64, heads, dim, dtype), _float_cache(64, heads, dim, dtype)
    write_kv(triton_cache, k, v, slots)
    write_kv_torch(torch_cache, k, v, slots)
    # A copy is exact: same bits as the torch path and as the values themselves.
    for a, b in zip(_tensors(triton_cache), _tensors(torch_cache), strict=True):
        assert torch.equal(a, b)
    keep = slots >= 0
    assert torch.equal(triton_cache.keys[slots[keep]], k[keep])
    assert torch.equal(triton_cache.values[slots[keep]], v[keep])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert not triton_cache.keys[untouched].any()  # slot -1 wrote nowhere
    assert not triton_cache.values[untouched].any()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "dim", "param_dtype"), [(1, 40, torch.float16), (3, 64, torch.float32)])
def test_write_quantized_cache(
    bits: int, dtype: torch.dtype, heads: int, dim: int, param_dtype: torch.dtype
) -> None:
    torch.manual_seed(1)
    n, num_slots = 9, 48
    slots = torch.tensor([4, 47, -1, 0, 17, 18, 30, -1, 9])
    k = (torch.randn(n, heads, dim) * 2 + 0.5).to(dtype)
    v = torch.randn(n, heads, dim).to(dtype)
    k[3, 0] = 0.0  # an all-zero vector must come back exactly
    layout = QuantizedKVLayout(bits, dim, param_dtype)
    triton_cache = layout.allocate(1, num_slots, heads).layer(0)
    torch_cache = layout.allocate(1, num_slots, heads).layer(0)
    write_kv(triton_cache, k, v, slots)
    write_kv_torch(torch_cache, k, v, slots)
    # Same fp32 arithmetic in the interpreter: codes, scales and zero points are bit-identical.
    for a, b in zip(_tensors(triton_cache), _tensors(torch_cache), strict=True):
        assert torch.equal(a, b)
    keep = slots >= 0
    used = slots[keep]
    assert triton_cache.keys.shape == (num_slots, heads, layout.storage_dim)
    for codes, scales, zeros, x in (
        (triton_cache.keys, triton_cache.k_scales, triton_cache.k_zeros, k),
        (triton_cache.values, triton_cache.v_scales, triton_cache.v_zeros, v),
    ):
        assert scales is not None and zeros is not None
        s, z = scales[used].float(), zeros[used].float()
        assert bool((z >= 0).all()) and bool((z <= layout.qmax).all()) and torch.equal(z, z.round())
        deq = dequantize_kv(codes[used], scales[used], zeros[used], bits, torch.float32)
        err = (deq - x[keep].float()).abs()
        # Rounding error is half a step; rounding the scale to param_dtype can stretch the range
        # end by up to qmax * scale * eps(param_dtype).
        bound = s * (0.5 + layout.qmax * torch.finfo(param_dtype).eps) + 1e-6
        assert bool((err <= bound[..., None]).all()), float((err - bound[..., None]).max())
    z_slot = int(slots[3])
    assert triton_cache.k_scales is not None and triton_cache.k_zeros is not None
    deq0 = dequantize_kv(
        triton_cache.keys[z_slot, 0],
        triton_cache.k_scales[z_slot, 0],
        triton_cache.k_zeros[z_slot, 0],
        bits,
        torch.float32,
    )
    assert not deq0.any()


def test_quantize_exact_values() -> None:
    # int8: a ramp whose range is exactly 255 steps of 0.25 maps onto the codes 0..255.
    x = (torch.arange(256, dtype=torch.float32) - 100) * 0.25
    q, s, z = quantize_kv(x[None], 8, torch.float32)
    assert torch.equal(q[0], torch.arange(256, dtype=torch.uint8))
    assert float(s) == 0.25 and float(z) == 100.0
    # int4: codes 0..15 packed two a byte, element 2j in the low nibble of byte j.
    y = torch.arange(16, dtype=torch.float32) * 0.5
    q4, s4, z4 = quantize_kv(y[None], 4, torch.float16)
    expected = torch.tensor([2 * j + ((2 * j + 1) << 4) for j in range(8)], dtype=torch.uint8)
    assert torch.equal(q4[0], expected)
    assert float(s4) == 0.5 and float(z4) == 0.0
    assert torch.equal(dequantize_kv(q4, s4, z4, 4, torch.float32)[0], y)
    # The kernel agrees on these exact values.
    layout = QuantizedKVLayout(4, 16, torch.float16)
    cache = layout.allocate(1, 4, 1).layer(0)
    write_kv(cache, y.view(1, 1, 16), -y.view(1, 1, 16), torch.tensor([2]))
    assert torch.equal(cache.keys[2, 0], expected)
    assert torch.equal(
        dequantize_kv(cache.values[2], cache.v_scales[2], cache.v_zeros[2], 4, torch.float32)[0], -y
    )


def test_layout_memory_and_errors() -> None:
    # int4 with fp16 parameters: 64 bytes of codes + 4 of parameters per (token, head) for D = 128.
    assert QuantizedKVLayout(4, 128).bytes_per_token(num_layers=2, num_kv_heads=8) == 2 * 2 * 8 * (64 + 4)
    assert QuantizedKVLayout(8, 128).bytes_per_token(2, 8) == 2 * 2 * 8 * (128 + 4)
    with pytest.raises(InferError, match="8 or 4 bits"):
        QuantizedKVLayout(3, 64)
    with pytest.raises(InferError, match="head_dim must be even"):
        QuantizedKVLayout(4, 41)
    cache = _float_cache(8, 2, 16, torch.float32)
    with pytest.raises(InferError, match="2 heads of 16"):
        write_kv(cache, torch.zeros(1, 3, 16), torch.zeros(1, 3, 16), torch.tensor([0]))
    with pytest.raises(InferError, match="slot_mapping"):
        write_kv(cache, torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), torch.tensor([0]))
    bad = PagedKV(torch.zeros(8, 2, 16, dtype=torch.uint8), torch.zeros(8, 2, 16, dtype=torch.uint8), bits=8)
    with pytest.raises(InferError, match="scales and zero points"):
        write_kv(bad, torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), torch.tensor([0]))


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache = _float_cache(8, 1, 16, torch.float32)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        write_kv(cache, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), torch.tensor([0]))


def test_without_triton_the_launchers_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmstack.infer.kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "_import_triton", lambda: None)
    cache = _float_cache(8, 1, 16, torch.float32)
    k = torch.ones(1, 1, 16)
    with pytest.raises(KernelUnavailableError, match=r"lmstack-infer\[kernels\]"):
        write_kv(cache, k, k, torch.tensor([0]))
    write_kv_torch(cache, k, k, torch.tensor([0]))  # the torch path needs no triton
    assert torch.equal(cache.keys[0], k[0])
