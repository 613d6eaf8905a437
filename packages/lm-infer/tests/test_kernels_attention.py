"""Paged decode and prefill attention kernels, in Triton's CPU interpreter.

Each case builds a paged cache with scattered (permuted) blocks and contexts that are not multiples of
the block size, writes the keys and values with the Triton write kernel, then checks:

* the Triton kernel against the torch reference (``*_torch``) reading the same cache, and
* the torch reference against a dense SDPA on each sequence's original, unpaged keys and values,
  so the reference itself is checked (for quantized caches with a bound derived from the scales).

Tolerances: fp32 1e-5 (same math, different summation order; dots in IEEE fp32). fp16 5e-3 absolute:
the kernel feeds fp16 q, k, v and the fp16-rounded softmax weights to its dots (relative error 2^-11
each, times values of magnitude <= ~4) and rounds the output (|o| <= ~2) to fp16, half an ulp 2^-11 * 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lmstack.infer import InferError
from lmstack.infer.kernels import (
    PagedKV,
    QuantizedKVLayout,
    decode_attention,
    decode_attention_torch,
    dequantize_kv,
    prefill_attention,
    prefill_attention_torch,
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


TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


@dataclass
class Scenario:
    cache: PagedKV
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    keys: list[torch.Tensor]  # per sequence [ctx, Hkv, D], as written
    values: list[torch.Tensor]


def _scenario(
    context_lens: list[int],
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    bits: int | None,
    seed: int,
    kernel_write: bool = False,
) -> Scenario:
    """A filled cache; written by the torch path unless ``kernel_write`` (the two are bit-identical,
    see test_kernels_kv.py, and the interpreter's write is the slow part of a case)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: tables are wider than needed
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    if bits is None:
        shape = (num_blocks * block_size, kv_heads, dim)
        cache = PagedKV(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    else:
        cache = QuantizedKVLayout(bits, dim).allocate(1, num_blocks * block_size, kv_heads).layer(0)
    perm = torch.randperm(num_blocks, generator=gen)  # scattered, non-consecutive blocks
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    keys, values, slots = [], [], []
    used = 0
    for s, (ctx, nb) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        tables[s, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        pos = torch.arange(ctx)
        slots.append(tables[s, pos // block_size].long() * block_size + pos % block_size)
        keys.append(torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype))
        values.append(torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype))
    (write_kv if kernel_write else write_kv_torch)(
        cache, torch.cat(keys), torch.cat(values), torch.cat(slots)
    )
    return Scenario(cache, tables, torch.tensor(context_lens, dtype=torch.int32), keys, values)


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """SDPA of ``q [Q, Hq, D]`` at absolute positions ``q_pos`` over one sequence's ``k/v [K, Hkv, D]``."""
    kp = torch.arange(k.shape[0])
    mask = kp[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kp[None, :] > q_pos[:, None] - window
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],
        k.float().transpose(0, 1)[None],
        v.float().transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _quantization_bound(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bits: int
) -> torch.Tensor:
    """Worst-case |o_quant - o| per query head for one sequence (``q [Q, Hq, D]``, ``k/v [K, Hkv, D]``).

    Key errors are at most s_k / 2 per element, so each score moves by at most
    eps = scale * |q|_1 * max s_k / 2, and the softmax weights by at most e^(2 eps) - 1 in L1:
    the output moves by that times max|v|. Value errors (s_v / 2) move a convex combination by at
    most max s_v / 2. (Each scale is the one the quantizer actually stored.)
    """
    _, s_k, _ = quantize_kv(k, bits)
    _, s_v, _ = quantize_kv(v, bits)
    group = q.shape[1] // k.shape[1]
    sk = s_k.float().amax(0).repeat_interleave(group)  # [Hq]
    sv = s_v.float().amax(0).repeat_interleave(group)
    vmax = v.float().abs().amax((0, 2)).repeat_interleave(group)
    eps = scale * q.float().abs().sum(-1) * sk / 2  # [Q, Hq]
    return (torch.exp(2 * eps) - 1) * vmax + sv / 2 + 1e-4


DECODE_CASES = [
    # dim, group, block_size, dtype, bits, window, partition (None: default split heuristic)
    pytest.param(40, 1, 8, torch.float32, None, None, None, id="d40-mha-bs8-fp32"),
    pytest.param(64, 2, 16, torch.float32, None, 7, 16, id="d64-gqa2-bs16-fp32-window-splits"),
    pytest.param(40, 4, 16, torch.float16, None, None, 4096, id="d40-gqa4-bs16-fp16-single-split"),
    pytest.param(64, 4, 8, torch.float16, None, 5, None, id="d64-gqa4-bs8-fp16-window"),
    pytest.param(40, 2, 8, torch.float32, 8, None, 16, id="d40-gqa2-bs8-fp32-int8"),
    pytest.param(64, 4, 16, torch.float16, 8, 9, None, id="d64-gqa4-bs16-fp16-int8-window"),
    pytest.param(40, 4, 16, torch.float32, 4, None, None, id="d40-gqa4-bs16-fp32-int4"),
    pytest.param(64, 1, 8, torch.float16, 4, 6, 16, id="d64-mha-bs8-fp16-int4-window"),
]


@pytest.mark.parametrize(("dim", "group", "block_size", "dtype", "bits", "window", "partition"), DECODE_CASES)
def test_decode_attention(
    dim: int,
    group: int,
    block_size: int,
    dtype: torch.dtype,
    bits: int | None,
    window: int | None,
    partition: int | None,
) -> None:
    kv_heads = 2
    context_lens = [1, 13, 45, 30]
    sc = _scenario(
        context_lens,
        kv_heads,
        dim,
        block_size,
        dtype,
        bits,
        seed=dim + group + block_size,
        kernel_write=bits == 4,
    )
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(len(context_lens), kv_heads * group, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    args = (q, sc.cache, sc.block_tables, sc.context_lens)
    kw = {"block_size": block_size, "scale": scale, "window": window}
    out = decode_attention(*args, **kw, partition_size=partition)
    ref = decode_attention_torch(*args, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    for s, ctx in enumerate(context_lens):
        pos = torch.tensor([ctx - 1])
        dense = _dense(q[s : s + 1], sc.keys[s], sc.values[s], pos, scale, window)[0]
        if bits is None:
            torch.testing.assert_close(ref[s].float(), dense, atol=tol, rtol=0)
        else:
            # The reference on the quantized cache equals dense attention on dequantized keys ...
            kq = dequantize_kv(*quantize_kv(sc.keys[s], bits), bits, torch.float32)
            vq = dequantize_kv(*quantize_kv(sc.values[s], bits), bits, torch.float32)
            dq = _dense(q[s : s + 1], kq, vq, pos, scale, window)[0]
            torch.testing.assert_close(ref[s].float(), dq, atol=tol, rtol=0)
            # ... and stays within the quantization bound of the unquantized result.
            bound = _quantization_bound(q[s : s + 1], sc.keys[s], sc.values[s], scale, bits)[0]
            assert bool(((ref[s].float() - dense).abs().amax(-1) <= bound).all())


def test_int_kv_error_is_small_in_practice() -> None:
    """Typical (not worst-case) error: int8 is ~20x more accurate than int4.

    Thresholds are about 3x what was measured here (fp32, D=64, 300 keys, unit-normal q/k/v, error
    RMS over the RMS of the exact output, which averaging over 300 random values makes small):
    0.0072 for int8 and 0.145 for int4.
    """
    ctx, dim = [300], 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, dim, generator=gen)
    errs = {}
    for bits in (8, 4):
        sc = _scenario(ctx, 2, dim, 16, torch.float32, bits, seed=11)
        out = decode_attention(q, sc.cache, sc.block_tables, sc.context_lens, block_size=16, scale=dim**-0.5)
        dense = _dense(q, sc.keys[0], sc.values[0], torch.tensor([ctx[0] - 1]), dim**-0.5, None)
        errs[bits] = float((out - dense).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt())
    assert errs[8] < 0.025 and errs[4] < 0.45 and errs[8] < errs[4] / 5, errs


PREFILL_CASES = [
    # dim, group, block_size, dtype, bits, window
    pytest.param(40, 1, 8, torch.float32, None, None, id="d40-mha-bs8-fp32"),
    pytest.param(64, 2, 16, torch.float32, None, 6, id="d64-gqa2-bs16-fp32-window"),
    pytest.param(40, 4, 16, torch.float16, None, None, id="d40-gqa4-bs16-fp16"),
    pytest.param(64, 2, 8, torch.float16, 8, None, id="d64-gqa2-bs8-fp16-int8"),
    pytest.param(40, 4, 8, torch.float32, 4, 9, id="d40-gqa4-bs8-fp32-int4-window"),
]


@pytest.mark.parametrize(("dim", "group", "block_size", "dtype", "bits", "window"), PREFILL_CASES)
def test_prefill_attention(
    dim: int, group: int, block_size: int, dtype: torch.dtype, bits: int | None, window: int | None
) -> None:
    kv_heads = 2
    # (context, new query tokens): a fresh prompt, prefix hits, a chunk longer than one query tile
    # (block_m=16), and a one-token tail.
    seqs = [(7, 7), (37, 5), (45, 20), (19, 1)]
    context_lens = [c for c, _ in seqs]
    q_lens = torch.tensor([n for _, n in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    sc = _scenario(
        context_lens,
        kv_heads,
        dim,
        block_size,
        dtype,
        bits,
        seed=dim * group + block_size,
        kernel_write=bits == 8,
    )
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(int(q_lens.sum()), kv_heads * group, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    kw = {"block_size": block_size, "scale": scale, "window": window}
    out = prefill_attention(q, sc.cache, cu, sc.context_lens, sc.block_tables, **kw, block_m=16, block_n=16)
    ref = prefill_attention_torch(q, sc.cache, cu, sc.context_lens, sc.block_tables, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    for s, (ctx, n) in enumerate(seqs):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        pos = torch.arange(ctx - n, ctx)
        if bits is None:
            k, v = sc.keys[s], sc.values[s]
        else:
            k = dequantize_kv(*quantize_kv(sc.keys[s], bits), bits, torch.float32)
            v = dequantize_kv(*quantize_kv(sc.values[s], bits), bits, torch.float32)
        dense = _dense(q[rows], k, v, pos, scale, window)
        torch.testing.assert_close(ref[rows].float(), dense, atol=tol, rtol=0)
        if bits is not None:
            exact = _dense(q[rows], sc.keys[s], sc.values[s], pos, scale, window)
            bound = _quantization_bound(q[rows], sc.keys[s], sc.values[s], scale, bits)
            assert bool(((ref[rows].float() - exact).abs().amax(-1) <= bound).all())


def test_decode_matches_prefill_of_one_token() -> None:
    # The two kernels agree where their contracts overlap: one new token per sequence.
    sc = _scenario([9, 33], 2, 40, 8, torch.float32, None, seed=2)
    q = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(1))
    kw = {"block_size": 8, "scale": 40**-0.5, "window": None}
    dec = decode_attention(q, sc.cache, sc.block_tables, sc.context_lens, **kw, partition_size=16)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    pre = prefill_attention(q, sc.cache, cu, sc.context_lens, sc.block_tables, **kw, block_m=16, block_n=16)
    torch.testing.assert_close(dec, pre, atol=1e-5, rtol=0)


def test_attention_argument_errors() -> None:
    sc = _scenario([5], 2, 16, 8, torch.float32, None, seed=0)
    kw = {"block_size": 8, "scale": 0.25}
    with pytest.raises(InferError, match="not a multiple"):
        decode_attention(torch.zeros(1, 3, 16), sc.cache, sc.block_tables, sc.context_lens, **kw)
    with pytest.raises(InferError, match="head_dim"):
        decode_attention(torch.zeros(1, 2, 32), sc.cache, sc.block_tables, sc.context_lens, **kw)
    with pytest.raises(InferError, match="block_tables"):
        decode_attention(torch.zeros(2, 2, 16), sc.cache, sc.block_tables, torch.tensor([5, 5]), **kw)
    with pytest.raises(InferError, match="block_m"):
        prefill_attention(
            torch.zeros(1, 2, 16), sc.cache, torch.tensor([0, 1], dtype=torch.int32), sc.context_lens,
            sc.block_tables, **kw, block_m=24,
        )  # fmt: skip
