"""The element-wise Triton kernels and the W4A16 GEMM on a GPU, against their torch references (issue 15).

Ready to run in one call when a GPU is lent (not run in the session that wrote it: no GPU there)::

    .venv/bin/python -m pytest benchmarks/test_kernels_gpu_ops.py -m gpu -s -q

Setup: fp16 at Llama-3-8B serving shapes (hidden 4096, intermediate 14336, 32 query heads over 8 KV
heads, head_dim 128) for 1, 64 and 2,048 tokens (one decode step, a decode batch, a prefill chunk).
For each kernel it prints the microseconds per call of the Triton kernel, of its torch reference in
eager mode and of the reference under ``torch.compile``, the speed-up over eager, and the bandwidth the
kernel reaches (bytes it must move / time; for the memory-bound kernels the fraction of the H200's
4.8 TB/s when the GPU is one) or, for the W4A16 GEMM, its TFLOP/s; with the GPU's name. The figures are
also written to ``.benchmarks/kernels_gpu_ops.json`` (``LMSTACK_BENCH_DIR`` overrides the folder).
Timing uses CUDA events around 20 calls after 5 warm-up calls (the first compiles). What is asserted
is only that each kernel agrees with its reference (the tolerances of tests/test_kernels_ops.py and
tests/test_kernels_w4a16.py, widened for the longer float16 sums of 4096-wide rows).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.infer.kernels._activation import silu_and_mul, silu_and_mul_reference
from lmstack.infer.kernels._rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_reference,
    rmsnorm,
    rmsnorm_reference,
)
from lmstack.infer.kernels._rotary import rotary_inplace, rotary_reference
from lmstack.infer.kernels._w4a16 import w4a16_gemm, w4a16_gemm_reference
from lmstack.infer.quant._packing import pack_awq, quantize_groupwise

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_timing import time_us

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128
TOKENS = [1, 64, 2048]
H200_BYTES_PER_S = 4.8e12
RESULTS: list[dict[str, Any]] = []


def _compiled_us(ref: Callable[..., Any], *args: Any) -> float | str:
    """Microseconds of ``torch.compile(ref)(*args)``, or why it could not be compiled."""
    try:
        compiled = torch.compile(ref, dynamic=False)
        return time_us(lambda: compiled(*args))
    except Exception as exc:  # reported, not hidden: the figure is then missing from the table
        return f"compile failed: {type(exc).__name__}: {exc}"[:200]


def _record(
    kernel: str, tokens: int, triton_us: float, eager_us: float, compiled: float | str, **extra: Any
) -> None:
    gpu = torch.cuda.get_device_name()
    row: dict[str, Any] = {
        "gpu": gpu,
        "kernel": kernel,
        "tokens": tokens,
        "triton_us": round(triton_us, 2),
        "torch_eager_us": round(eager_us, 2),
        "torch_compile_us": round(compiled, 2) if isinstance(compiled, float) else compiled,
        "speedup_vs_eager": round(eager_us / triton_us, 2),
        **extra,
    }
    if "bytes" in extra:
        row["triton_GB_s"] = round(extra["bytes"] / (triton_us * 1e-6) / 1e9, 1)
        if "H200" in gpu:
            row["fraction_of_hbm"] = round(extra["bytes"] / (triton_us * 1e-6) / H200_BYTES_PER_S, 3)
    RESULTS.append(row)
    print(" ".join(f"{k}={v}" for k, v in row.items()))
    root = Path(__file__).resolve().parent.parent
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", root / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu_ops.json").write_text(json.dumps(RESULTS, indent=2) + "\n")


def _gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


@pytest.mark.parametrize("tokens", TOKENS)
def test_rmsnorm_speed(tokens: int) -> None:
    g = _gen()
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6), rtol=4e-3, atol=4e-3)
        t = time_us(lambda: rmsnorm(x, w, 1e-6))
        e = time_us(lambda: rmsnorm_reference(x, w, 1e-6))
        c = _compiled_us(rmsnorm_reference, x, w, 1e-6)
    _record("rmsnorm", tokens, t, e, c, bytes=2 * x.numel() * 2 + w.numel() * 2)


@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rmsnorm_speed(tokens: int) -> None:
    g = _gen()
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    r = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(HIDDEN, device="cuda", dtype=torch.float16, generator=g)
    with torch.no_grad():
        out, total = fused_add_rmsnorm(x, r, w, 1e-6)
        ref_out, ref_total = fused_add_rmsnorm_reference(x, r, w, 1e-6)
        assert torch.equal(total, ref_total)
        torch.testing.assert_close(out, ref_out, rtol=4e-3, atol=4e-3)
        t = time_us(lambda: fused_add_rmsnorm(x, r, w, 1e-6))
        e = time_us(lambda: fused_add_rmsnorm_reference(x, r, w, 1e-6))
        c = _compiled_us(fused_add_rmsnorm_reference, x, r, w, 1e-6)
    _record("fused_add_rmsnorm", tokens, t, e, c, bytes=4 * x.numel() * 2 + w.numel() * 2)


@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary_speed(tokens: int) -> None:
    g = _gen()
    qkv = torch.randn(1, tokens, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.float16, generator=g)
    q, k, _ = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k = q.view(1, tokens, HQ, D), k.view(1, tokens, HKV, D)
    angles = torch.rand(1, tokens, D // 2, device="cuda", generator=g) * 100
    cos = torch.cat([angles.cos()] * 2, -1).half()
    sin = torch.cat([angles.sin()] * 2, -1).half()
    with torch.no_grad():
        ref_q, ref_k = rotary_reference(q, k, cos, sin)
        q0, k0 = q.clone(), k.clone()
        rotary_inplace(q, k, cos, sin)
        torch.testing.assert_close(q, ref_q, rtol=4e-3, atol=4e-3)
        torch.testing.assert_close(k, ref_k, rtol=4e-3, atol=4e-3)
        # In place, so repeated calls keep rotating the same buffer: the work per call is identical.
        t = time_us(lambda: rotary_inplace(q, k, cos, sin))
        e = time_us(lambda: rotary_reference(q0, k0, cos, sin))
        c = _compiled_us(rotary_reference, q0, k0, cos, sin)
    moved = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    _record("rotary", tokens, t, e, c, bytes=moved)


@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_speed(tokens: int) -> None:
    g = _gen()
    x = torch.randn(tokens, 2 * INTER, device="cuda", dtype=torch.float16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), rtol=4e-3, atol=4e-3)
        t = time_us(lambda: silu_and_mul(x))
        e = time_us(lambda: silu_and_mul_reference(x))
        c = _compiled_us(silu_and_mul_reference, x)
    _record("silu_and_mul", tokens, t, e, c, bytes=3 * tokens * INTER * 2)


@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
@pytest.mark.parametrize(("k", "n"), [(HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)])
def test_w4a16_gemm_speed(tokens: int, k: int, n: int) -> None:
    g = _gen()
    weight = 0.02 * torch.randn(n, k, device="cuda", generator=g)
    qweight, qzeros, scales = pack_awq(quantize_groupwise(weight, 4, 128))
    x = torch.randn(tokens, k, device="cuda", dtype=torch.float16, generator=g)
    dense = weight.half()
    with torch.no_grad():
        got = w4a16_gemm(x, qweight, qzeros, scales)
        ref = w4a16_gemm_reference(x, qweight, qzeros, scales)
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
        t = time_us(lambda: w4a16_gemm(x, qweight, qzeros, scales))
        e = time_us(lambda: w4a16_gemm_reference(x, qweight, qzeros, scales))
        c = _compiled_us(w4a16_gemm_reference, x, qweight, qzeros, scales)
        fp16_us = time_us(lambda: torch.nn.functional.linear(x, dense))  # cuBLAS on the fp16 weight
    weight_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
    _record(
        f"w4a16_gemm[{k}x{n}]",
        tokens,
        t,
        e,
        c,
        fp16_cublas_us=round(fp16_us, 2),
        triton_TFLOP_s=round(2 * tokens * k * n / (t * 1e-6) / 1e12, 2),
        bytes=weight_bytes + x.numel() * 2 + tokens * n * 2,
    )
