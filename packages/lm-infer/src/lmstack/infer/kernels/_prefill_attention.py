"""Variable-length prefill attention over the paged cache, with prefix hits.

The queries of several sequences travel flattened, ``[Ntok, Hq, D]``, delimited by ``cu_seqlens_q``
(``[0, q0, q0 + q1, ...]``). Sequence ``s`` has ``context_lens[s]`` keys in the cache: a cached prefix
(a prefix-cache hit, or earlier chunks of a chunked prefill) followed by this step's tokens, which
:func:`~lmstack.infer.kernels.write_kv` has already stored. Its query ``i`` sits at absolute position
``context_lens[s] - q_len + i`` and sees keys up to and including that position (and, with a sliding
window, only the last ``window`` of them).

Kernel design (Triton, :func:`prefill_attention`): grid ``(query tiles, sequences, q heads)``; a
program takes ``BLOCK_M`` queries of one head and runs a flash-attention loop over ``BLOCK_N``-key
tiles gathered through the block table, from the window's start (or 0) up to the causal limit of its
last query, so tiles past the diagonal are never read. int8/int4 caches are dequantized on load.
Query tiles beyond a shorter sequence's length do no work. One program per query head keeps it
simple; GQA heads of a group re-read the same keys (from L2 on a GPU).

:func:`prefill_attention_torch` is the plain-torch reference (and CPU path): it pads queries and
gathered keys per sequence and runs masked SDPA.

How the engine calls it, per layer, for the prefill chunks of a step (after ``write_kv``)::

    out = prefill_attention(
        q,                      # [Ntok, Hq, D]: the chunks' tokens, sequence after sequence
        cache.layer(layer_idx), # PagedKV
        cu_seqlens_q,           # [S + 1] int32
        context_lens,           # [S] int32: cached prefix + this chunk
        block_tables,           # [S, max_blocks] int32
        block_size=block_size, scale=scale, window=window,
        max_query_len=max_q,    # host int, known to the scheduler
    )                           # -> [Ntok, Hq, D] in q's dtype

Speed on a GPU is not measured here (no GPU in the session that wrote this).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmstack.infer._errors import InferError
from lmstack.infer.kernels._decode_attention import cache_args, check_attention_inputs, gather_context
from lmstack.infer.kernels._kv_write import PagedKV
from lmstack.infer.kernels._triton_utils import check_device, jit_kernel, next_power_of_2, tl

__all__ = ["prefill_attention", "prefill_attention_torch"]

_LOG2E = 1.4426950408889634


def prefill_attention_torch(
    q: Tensor,
    cache: PagedKV,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    *,
    block_size: int,
    scale: float,
    window: int | None = None,
) -> Tensor:
    """Plain-torch varlen prefill attention over the paged cache (reference and CPU path).

    Args:
        q: ``[Ntok, Hq, D]`` queries of all sequences, flattened.
        cache: One layer's cache (float or quantized), already holding this step's keys.
        cu_seqlens_q: ``[S + 1]`` cumulative query counts, starting at 0.
        context_lens: ``[S]`` keys per sequence (cached prefix plus this step's tokens).
        block_tables: ``[S, max_blocks]`` block ids.
        block_size: Slots per block.
        scale: Softmax scale.
        window: Sliding window, or None.

    Returns:
        ``[Ntok, Hq, D]`` in ``q``'s dtype; computed in fp32.
    """
    ntok, hq, d = q.shape
    device = q.device
    cu = cu_seqlens_q.to(device=device, dtype=torch.long)
    q_lens = cu[1:] - cu[:-1]
    ctx = context_lens.to(device=device, dtype=torch.long)
    s = q_lens.numel()
    q_max = int(q_lens.max())
    keys, values, pos = gather_context(cache, block_tables, ctx, block_size, int(ctx.max()), torch.float32)
    i = torch.arange(q_max, device=device)
    q_valid = i[None, :] < q_lens[:, None]  # [S, Qmax]
    tok = torch.where(q_valid, cu[:-1, None] + i[None, :], torch.zeros((), dtype=torch.long, device=device))
    qp = q.float().index_select(0, tok.reshape(-1)).view(s, q_max, hq, d)
    q_pos = (ctx - q_lens)[:, None] + i[None, :]  # absolute position of each query
    mask = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx[:, None, None])
    if window is not None:
        mask &= pos[None, None, :] > q_pos[:, :, None] - window
    mask |= (~q_valid)[:, :, None] & (pos[None, None, :] == 0)  # padded queries: finite softmax
    out = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=hq != keys.shape[2],
    )  # [S, Hq, Qmax, D]
    out = out.transpose(1, 2)[q_valid]  # [Ntok, Hq, D], sequences in order
    if out.shape[0] != ntok:
        raise InferError(f"cu_seqlens_q covers {out.shape[0]} tokens but q holds {ntok}.")
    return out.to(q.dtype)


def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    kz_ptr,
    vs_ptr,
    vz_ptr,
    cu_ptr,
    ctx_ptr,
    bt_ptr,
    out_ptr,
    qk_scale,
    window,
    block_size,
    group,
    head_dim,
    q_s0,
    q_s1,
    c_s0,
    c_s1,
    p_s0,
    p_s1,
    bt_s0,
    o_s0,
    o_s1,
    BITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // group
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    ctx = tl.load(ctx_ptr + seq)
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_pos = ctx - q_len + i
    qd_mask = (i[:, None] < q_len) & (d[None, :] < head_dim)
    rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_s0 + head * q_s1 + d[None, :], mask=qd_mask, other=0.0)
    # Keys up to the causal limit of the tile's last query; none for a tile past the sequence.
    hi = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(lo, ctx - q_len + tile * BLOCK_M - window + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BITS == 4:
        byte_col = d // 2
        shift = (d % 2) * 4
    else:
        byte_col = d
        shift = d * 0
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
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
        ok = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            ok = ok & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row may have no visible key in this tile (causal edge, window): keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + rows[:, None] * o_s0 + head * o_s1 + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def prefill_attention(
    q: Tensor,
    cache: PagedKV,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    *,
    block_size: int,
    scale: float,
    window: int | None = None,
    max_query_len: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> Tensor:
    """Varlen prefill attention over the paged cache with the Triton kernel (see the module docstring).

    Args:
        q: ``[Ntok, Hq, D]`` queries of all sequences, flattened.
        cache: One layer's cache (float or quantized), already holding this step's keys.
        cu_seqlens_q: ``[S + 1]`` cumulative query counts (int32), starting at 0.
        context_lens: ``[S]`` keys per sequence (int32): cached prefix plus this step's tokens.
        block_tables: ``[S, max_blocks]`` block ids (int32).
        block_size: Slots per block.
        scale: Softmax scale.
        window: Sliding window, or None.
        max_query_len: The longest query run (read from ``cu_seqlens_q`` when omitted: a device sync).
        block_m: Queries per program (a power of two, at least 16).
        block_n: Keys per tile (a power of two, at least 16).

    Returns:
        ``[Ntok, Hq, D]`` in ``q``'s dtype.

    Raises:
        InferError: On inconsistent shapes.
        KernelUnavailableError: Without triton, or on CPU tensors outside the interpreter.
    """
    ntok, hq, d = q.shape
    s = cu_seqlens_q.numel() - 1
    _, group = check_attention_inputs(q, cache, block_tables, s)
    if s < 1 or context_lens.shape != (s,):
        raise InferError(
            f"cu_seqlens_q must be [S + 1] and context_lens [S]; got {tuple(cu_seqlens_q.shape)} and "
            f"{tuple(context_lens.shape)}."
        )
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise InferError(f"{name} must be a power of two >= 16, got {b}.")
    check_device(q, cache.keys, cu_seqlens_q, context_lens, block_tables)
    out = torch.empty_like(q)
    if ntok == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    kc, vc, ks, kz, vs, vz, ps0, ps1 = cache_args(cache)
    jit_kernel(_prefill_kernel)[(math.ceil(max_query_len / block_m), s, hq)](
        q,
        kc,
        vc,
        ks,
        kz,
        vs,
        vz,
        cu_seqlens_q,
        context_lens,
        block_tables,
        out,
        scale * _LOG2E,
        window or 0,
        block_size,
        group,
        d,
        q.stride(0),
        q.stride(1),
        kc.stride(0),
        kc.stride(1),
        ps0,
        ps1,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        BITS=cache.bits or 0,
        USE_WINDOW=window is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_D=max(16, next_power_of_2(d)),
        BLOCK_N=block_n,
    )
    return out
