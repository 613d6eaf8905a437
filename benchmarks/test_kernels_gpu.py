"""Paged decode attention on a GPU: the Triton split-K kernel against the torch reference (issue 15).

Ready to run in one call when a GPU is lent (not run in the session that wrote it: no GPU there)::

    .venv/bin/python -m pytest benchmarks/test_kernels_gpu.py -m gpu -s -q

Setup: fp16, 32 query heads over 8 KV heads (GQA 4), head_dim 128, block size 16, 2,048-token
contexts on scattered (shuffled) blocks, batch 1, 32 and 128, with an fp16 cache and an int8 one.
For each it prints the microseconds per call of :func:`decode_attention` (Triton) and
:func:`decode_attention_torch` (the reference: gather + SDPA), their ratio, and the bandwidth the
kernel reaches (cache bytes read / time), with the GPU's name; it also records them in
``.benchmarks/kernels_gpu.json`` (``LMSTACK_BENCH_DIR`` overrides the folder). Timing uses CUDA
events around 20 calls after 5 warm-up calls (the first compiles). What is asserted is only that the
kernel agrees with the reference (fp16 tolerance 5e-3, see tests/test_kernels_attention.py).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.infer.kernels import (
    PagedKV,
    QuantizedKVLayout,
    decode_attention,
    decode_attention_torch,
    write_kv_torch,
)

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_timing import time_us

HQ, HKV, D, BLOCK, CTX = 32, 8, 128, 16, 2048


def _cache(batch: int, bits: int | None, gen: torch.Generator) -> tuple[PagedKV, torch.Tensor, torch.Tensor]:
    blocks = batch * CTX // BLOCK
    slots = blocks * BLOCK
    dev = torch.device("cuda")
    if bits is None:
        cache = PagedKV(
            torch.empty(slots, HKV, D, dtype=torch.float16, device=dev),
            torch.empty(slots, HKV, D, dtype=torch.float16, device=dev),
        )
    else:
        cache = QuantizedKVLayout(bits, D).allocate(1, slots, HKV, dev).layer(0)
    tables = torch.randperm(blocks, generator=gen).view(batch, CTX // BLOCK).to(dev, torch.int32)
    pos = torch.arange(CTX, device=dev)
    slot_map = (tables.long()[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1)
    k = torch.randn(batch * CTX, HKV, D, device=dev, dtype=torch.float16)
    v = torch.randn(batch * CTX, HKV, D, device=dev, dtype=torch.float16)
    write_kv_torch(cache, k, v, slot_map)
    ctx = torch.full((batch,), CTX, dtype=torch.int32, device=dev)
    return cache, tables, ctx


def _cache_bytes(cache: PagedKV, batch: int) -> int:
    per_token = 2 * HKV * cache.keys.shape[-1] * cache.keys.element_size()
    if cache.k_scales is not None:
        per_token += 4 * HKV * cache.k_scales.element_size()
    return batch * CTX * per_token


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_attention_speed() -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: this times the compiled kernels")
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name()
    rows: list[dict[str, Any]] = []
    for bits in (None, 8):
        for batch in (1, 32, 128):
            cache, tables, ctx = _cache(batch, bits, gen)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.float16)
            kw: dict[str, Any] = {"block_size": BLOCK, "scale": D**-0.5}
            out = decode_attention(q, cache, tables, ctx, **kw, max_context_len=CTX)
            ref = decode_attention_torch(q, cache, tables, ctx, **kw)
            torch.testing.assert_close(out.float(), ref.float(), atol=5e-3, rtol=0)
            args = (q, cache, tables, ctx)
            t_triton = time_us(functools.partial(decode_attention, *args, **kw, max_context_len=CTX))
            t_torch = time_us(functools.partial(decode_attention_torch, *args, **kw))
            gbps = _cache_bytes(cache, batch) / (t_triton * 1e-6) / 1e9
            row = {
                "kv": "fp16" if bits is None else f"int{bits}",
                "batch": batch,
                "context": CTX,
                "triton_us": round(t_triton, 1),
                "torch_us": round(t_torch, 1),
                "speedup": round(t_torch / t_triton, 2),
                "triton_GBps": round(gbps, 1),
            }
            rows.append(row)
            print(f"[{name}] decode attention {row}")
            del cache, tables, ctx, q, args
            torch.cuda.empty_cache()
    folder = Path(os.environ.get("LMSTACK_BENCH_DIR", ".benchmarks"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernels_gpu.json").write_text(json.dumps({"gpu": name, "decode_attention": rows}, indent=2))
