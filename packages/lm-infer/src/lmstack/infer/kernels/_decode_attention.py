"""Paged decode attention: one query token per sequence over its cached keys (split-K flash-decoding).

Kernel design (Triton, :func:`decode_attention`):

* Grid ``(sequences, kv_heads, splits)``. Each program takes one KV head and *all* the query heads of
  its GQA group (``Hq / Hkv`` rows, padded to 16 for ``tl.dot``), so every key and value is read
  from memory once per group, not once per query head; decode is memory-bound, this is what counts.
* The keys of a sequence are cut into ``splits`` partitions of ``partition_size`` tokens, each
  processed by its own program (flash-decoding): batch-1 decoding of a long context then still
  fills the GPU. Each program runs an online softmax over ``BLOCK_N``-token tiles, gathering each
  tile's slots through the block table, and writes its normalized partial output and log-sum-exp;
  a second kernel combines the partitions with log-sum-exp weights. With a single partition the
  first kernel writes the final output directly and the second is not launched.
* int8/int4 caches are dequantized in the kernel, ``(code - zero) * scale`` per (slot, kv head),
  exactly as :func:`~lmstack.infer.kernels.dequantize_kv` does.
* A sliding window skips whole tiles before the window: a query at position ``ctx - 1`` sees keys
  ``ctx - window .. ctx - 1``.

:func:`decode_attention_torch` is the plain-torch reference, also the CPU path: it gathers each
sequence's slots (dequantizing), then runs SDPA with the GQA group folded into query rows.

How the engine calls it, per layer, after :func:`~lmstack.infer.kernels.write_kv` stored the step's
keys and values::

    out = decode_attention(
        q,                      # [S, Hq, D]: the decode tokens of the step, one per sequence
        cache.layer(layer_idx), # PagedKV (float or quantized)
        block_tables,           # [S, max_blocks] int32 on the device, built once per step
        context_lens,           # [S] int32: tokens in each sequence including this one
        block_size=block_size, scale=scale, window=window,
        max_context_len=max_ctx,  # host int, known to the scheduler: avoids a device sync
    )                           # -> [S, Hq, D] in q's dtype

Speed on a GPU is not measured here (no GPU in the session that wrote this);
``benchmarks/test_kernels_gpu.py`` times it against the torch reference when one is lent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmstack.infer._errors import InferError
from lmstack.infer.kernels._kv_write import PagedKV, dequantize_kv
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = ["decode_attention", "decode_attention_torch", "gather_context"]

_LOG2E = 1.4426950408889634


def gather_context(
    cache: PagedKV,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    num_keys: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each sequence's first ``num_keys`` keys and values, read through its block table.

    Returns:
        ``(keys, values, positions)``: ``[S, num_keys, Hkv, D]`` each in ``dtype`` (dequantized when
        the cache is quantized; slots past a sequence's context hold slot 0's contents), and the key
        positions ``[num_keys]``.
    """
    device = cache.keys.device
    pos = torch.arange(num_keys, device=device)
    tables = block_tables.to(device=device, dtype=torch.long)
    blocks = tables[:, torch.div(pos, block_size, rounding_mode="floor")]  # [S, K]
    slots = blocks * block_size + pos % block_size
    slots = torch.where(pos[None, :] < context_lens.to(device)[:, None], slots, torch.zeros_like(slots))
    flat = slots.reshape(-1)
    out = []
    for codes, scales, zeros in cache.planes():
        x = codes.index_select(0, flat)
        if cache.bits is not None:
            assert scales is not None and zeros is not None
            x = dequantize_kv(x, scales.index_select(0, flat), zeros.index_select(0, flat), cache.bits, dtype)
        out.append(x.to(dtype).view(*slots.shape, *x.shape[1:]))
    return out[0], out[1], pos


def decode_attention_torch(
    q: Tensor,
    cache: PagedKV,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    block_size: int,
    scale: float,
    window: int | None = None,
) -> Tensor:
    """Plain-torch paged decode attention (the reference of :func:`decode_attention`; the CPU path).

    Args:
        q: ``[S, Hq, D]`` queries, one per sequence, at position ``context_lens[s] - 1``.
        cache: One layer's cache (float or quantized).
        block_tables: ``[S, max_blocks]`` block ids (int32 or int64).
        context_lens: ``[S]`` keys per sequence, this step's token included (at least 1).
        block_size: Slots per block.
        scale: Softmax scale.
        window: Sliding window (a query sees itself and ``window - 1`` keys before it), or None.

    Returns:
        ``[S, Hq, D]`` in ``q``'s dtype; computed in fp32.
    """
    s, hq, d = q.shape
    hkv = cache.keys.shape[1]
    num_keys = int(context_lens.max())
    keys, values, pos = gather_context(cache, block_tables, context_lens, block_size, num_keys, torch.float32)
    ctx = context_lens.to(device=q.device, dtype=torch.long)[:, None]
    mask = pos[None, :] < ctx
    if window is not None:
        mask &= pos[None, :] >= ctx - window
    # Fold the GQA group into query rows: [S, Hkv, G, D] against [S, Hkv, K, D].
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().view(s, hkv, hq // hkv, d),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return out.reshape(s, hq, d).to(q.dtype)


def _decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    kz_ptr,
    vs_ptr,
    vz_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    lse_ptr,
    qk_scale,
    window,
    block_size,
    group,
    head_dim,
    partition,
    q_s0,
    q_s1,
    c_s0,
    c_s1,
    p_s0,
    p_s1,
    bt_s0,
    o_s0,
    o_s1,
    o_s2,
    l_s0,
    l_s1,
    BITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    qh = kvh * group + g
    gd_mask = (g[:, None] < group) & (d[None, :] < head_dim)
    q = tl.load(q_ptr + seq.to(tl.int64) * q_s0 + qh[:, None] * q_s1 + d[None, :], mask=gd_mask, other=0.0)
    lo = split * partition
    hi = tl.minimum(lo + partition, ctx)
    if USE_WINDOW:
        lo = tl.maximum(lo, ctx - window)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if BITS == 4:
        byte_col = d // 2
        shift = (d % 2) * 4
    else:
        byte_col = d
        shift = d * 0
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi  # the first key of every tile is valid, so no row is fully masked
        blk = tl.load(bt_ptr + seq.to(tl.int64) * bt_s0 + pos // block_size, mask=valid, other=0)
        slot = blk.to(tl.int64) * block_size + pos % block_size
        kv_mask = valid[:, None] & (d[None, :] < head_dim)
        if BITS == 0:
            k = tl.load(k_ptr + slot[:, None] * c_s0 + kvh * c_s1 + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + slot[:, None] * c_s0 + kvh * c_s1 + d[None, :], mask=kv_mask, other=0.0)
        else:
            code_off = slot[:, None] * c_s0 + kvh * c_s1 + byte_col[None, :]
            par_off = slot * p_s0 + kvh * p_s1
            kc = tl.load(k_ptr + code_off, mask=kv_mask, other=0).to(tl.int32)
            vc = tl.load(v_ptr + code_off, mask=kv_mask, other=0).to(tl.int32)
            if BITS == 4:
                kc = (kc >> shift[None, :]) & 0xF
                vc = (vc >> shift[None, :]) & 0xF
            k_s = tl.load(ks_ptr + par_off, mask=valid, other=0.0).to(tl.float32)
            k_z = tl.load(kz_ptr + par_off, mask=valid, other=0.0).to(tl.float32)
            v_s = tl.load(vs_ptr + par_off, mask=valid, other=0.0).to(tl.float32)
            v_z = tl.load(vz_ptr + par_off, mask=valid, other=0.0).to(tl.float32)
            k = (kc.to(tl.float32) - k_z[:, None]) * k_s[:, None]
            v = (vc.to(tl.float32) - v_z[:, None]) * v_s[:, None]
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 domain
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0.0  # False only for a partition with no key in range (beyond ctx or the window)
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SINGLE:
        o_ptrs = out_ptr + seq.to(tl.int64) * o_s0 + qh[:, None] * o_s1 + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        base = seq.to(tl.int64) * o_s0 + qh[:, None] * o_s1 + split * o_s2
        tl.store(out_ptr + base + d[None, :], out, mask=gd_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq.to(tl.int64) * l_s0 + qh * l_s1 + split, lse, mask=g < group)


def _decode_reduce_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    head_dim,
    p_s0,
    p_s1,
    p_s2,
    l_s0,
    l_s1,
    o_s0,
    o_s1,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(
        lse_ptr + seq.to(tl.int64) * l_s0 + head * l_s1 + sp, mask=sp < num_splits, other=float("-inf")
    )
    top = tl.max(lse, axis=0)  # finite: every sequence has at least one key
    w = tl.exp2(lse - top)
    m = (sp[:, None] < num_splits) & (d[None, :] < head_dim)
    part = tl.load(
        part_ptr + seq.to(tl.int64) * p_s0 + head * p_s1 + sp[:, None] * p_s2 + d[None, :], mask=m, other=0.0
    )
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(
        out_ptr + seq.to(tl.int64) * o_s0 + head * o_s1 + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < head_dim,
    )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4  # the interpreter: few programs keep it fast


def check_attention_inputs(q: Tensor, cache: PagedKV, block_tables: Tensor, num_seqs: int) -> tuple[int, int]:
    """Validate shared attention arguments; return ``(kv_heads, group)``."""
    if q.dim() != 3:
        raise InferError(f"q must be [tokens, q_heads, head_dim], got {tuple(q.shape)}.")
    if cache.keys.dim() != 3:
        raise InferError(
            f"attention takes one layer's cache (3-D), got {cache.keys.dim()}-D: use cache.layer(i)."
        )
    cache.validate()
    hq, d = q.shape[1], q.shape[2]
    hkv = cache.keys.shape[1]
    if hq % hkv:
        raise InferError(f"q has {hq} heads, not a multiple of the cache's {hkv} kv heads.")
    if d != cache.head_dim:
        raise InferError(f"q's head_dim is {d} but the cache's is {cache.head_dim}.")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise InferError(f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}.")
    return hkv, hq // hkv


def cache_args(cache: PagedKV) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int]:
    """Pointers and parameter strides to hand a kernel (codes stand in for absent scale tensors)."""
    if cache.keys.stride(2) != 1 or cache.values.stride() != cache.keys.stride():
        raise InferError("keys and values must share one layout with a contiguous last dimension.")
    if cache.bits is None:
        return cache.keys, cache.values, cache.keys, cache.keys, cache.keys, cache.keys, 0, 0
    assert cache.k_scales is not None and cache.k_zeros is not None
    assert cache.v_scales is not None and cache.v_zeros is not None
    ps = cache.k_scales.stride()
    for t in (cache.k_zeros, cache.v_scales, cache.v_zeros):
        if t.stride() != ps:
            raise InferError("scales and zero points must share one memory layout.")
    return (
        cache.keys,
        cache.values,
        cache.k_scales,
        cache.k_zeros,
        cache.v_scales,
        cache.v_zeros,
        ps[0],
        ps[1],
    )


def decode_attention(
    q: Tensor,
    cache: PagedKV,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    block_size: int,
    scale: float,
    window: int | None = None,
    max_context_len: int | None = None,
    partition_size: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Paged decode attention with the Triton split-K kernels (see the module docstring).

    Args:
        q: ``[S, Hq, D]`` queries, one per sequence, at position ``context_lens[s] - 1``.
        cache: One layer's cache (float or quantized).
        block_tables: ``[S, max_blocks]`` block ids.
        context_lens: ``[S]`` keys per sequence (at least 1), int32 or int64.
        block_size: Slots per block.
        scale: Softmax scale.
        window: Sliding window, or None.
        max_context_len: The largest context length (read from ``context_lens`` when omitted, which
            syncs with the device).
        partition_size: Keys per split (rounded up to a multiple of ``block_n``); by default chosen
            so that sequences x kv heads x splits is about twice the GPU's multiprocessors.
        block_n: Keys per tile (a power of two, at least 16); default 64 (16 for short contexts).

    Returns:
        ``[S, Hq, D]`` in ``q``'s dtype.

    Raises:
        InferError: On inconsistent shapes.
        KernelUnavailableError: Without triton, or on CPU tensors outside the interpreter.
    """
    s, hq, d = q.shape
    hkv, group = check_attention_inputs(q, cache, block_tables, s)
    if context_lens.shape != (s,):
        raise InferError(f"context_lens must be [{s}], got {tuple(context_lens.shape)}.")
    check_device(q, cache.keys, block_tables, context_lens)
    out = torch.empty_like(q)
    if s == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    max_ctx = int(context_lens.max()) if max_context_len is None else max_context_len
    if max_ctx < 1:
        raise InferError("every decoding sequence needs at least one key (context_lens >= 1).")
    bn = block_n or (64 if max_ctx > 32 else 16)
    if bn < 16 or bn & (bn - 1):
        raise InferError(f"block_n must be a power of two >= 16, got {bn}.")
    if partition_size is None:
        splits = max(1, math.ceil(2 * _num_sms(q.device) / (s * hkv)))
        partition_size = math.ceil(max_ctx / splits)
    partition = max(bn, math.ceil(partition_size / bn) * bn)
    num_splits = math.ceil(max_ctx / partition)
    kc, vc, ks, kz, vs, vz, ps0, ps1 = cache_args(cache)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = max(16, next_power_of_2(d))
    single = num_splits == 1
    if single:
        part, lse = out, out
        o_strides = (out.stride(0), out.stride(1), 0)
        l_strides = (0, 0)
    else:
        part = torch.empty((s, hq, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((s, hq, num_splits), dtype=torch.float32, device=q.device)
        o_strides = (part.stride(0), part.stride(1), part.stride(2))
        l_strides = (lse.stride(0), lse.stride(1))
    jit_kernel(_decode_partial_kernel)[(s, hkv, num_splits)](
        q,
        kc,
        vc,
        ks,
        kz,
        vs,
        vz,
        block_tables,
        context_lens,
        part,
        lse,
        scale * _LOG2E,
        window or 0,
        block_size,
        group,
        d,
        partition,
        q.stride(0),
        q.stride(1),
        kc.stride(0),
        kc.stride(1),
        ps0,
        ps1,
        block_tables.stride(0),
        *o_strides,
        *l_strides,
        BITS=cache.bits or 0,
        USE_WINDOW=window is not None,
        SINGLE=single,
        PREC=prec,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=bn,
    )
    if not single:
        jit_kernel(_decode_reduce_kernel)[(s, hq)](
            part,
            lse,
            out,
            num_splits,
            d,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_S=next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )
    return out
