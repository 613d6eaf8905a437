"""Weight quantization: round-to-nearest, AWQ, weight-only linears and quantized checkpoints.

* :func:`quantize_model` replaces every decoder layer's projections with :class:`WeightOnlyLinear`
  modules: int8 per-channel or int4 group-wise weights, float activations (round to nearest, or AWQ).
* :func:`save_quantized` writes 4-bit models as AutoAWQ GEMM checkpoints and 8-bit ones as GPTQ
  (bits 8, per-channel, symmetric); :func:`load_quantized` reads those and other tools' AWQ GEMM and
  GPTQ (4-bit sym/asym, act-order; 8-bit symmetric per-channel) checkpoints. ``LLM(path)`` calls it
  when ``config.json`` has a ``quantization_config``.
* ``lmstack quantize rtn|awq PATH OUT --bits 8|4`` on the command line.

Why weight-only helps on CPU: single-stream decode reads every weight once per token, so it is
bound by memory bandwidth; int8 weights are a quarter and int4 an eighth of fp32's bytes. On CPU
the modules call torch's packed kernels (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``, as gpt-fast does); elsewhere they dequantize and multiply
(on CUDA the int4 GEMM is the Triton W4A16 kernel, ``lmstack.infer.kernels.w4a16_gemm``).

The CPU kernels take bfloat16 activations by default (their only vectorized path in torch 2.13;
see :mod:`lmstack.infer.quant._linear`): ``kernel_dtype=None`` keeps the model's dtype, exact but
30-150x slower.

Measured (a script timing single linears at the 56M llama's shapes, hidden 512, intermediate 1408,
8 heads / 4 KV heads, vocab 32000; torch 2.13 CPU, 2 threads, eight copies of each weight cycled so
they are read from memory, kinds interleaved, minimum of 7 repetitions; the 2-core AMD EPYC machine
was shared with other jobs at load 4, so single entries jumped to ~7.5 ms in some runs and are
left out). Batch 1, microseconds per call, fp32 = core's oneDNN ``InferenceLinear``:

    ===================  ======  ======  ==========  ===========
    projection            fp32    int8   int4 (128)  int8 / int4
    ===================  ======  ======  ==========  ===========
    qkv 512 -> 1024        39.0    26.9      23.0    1.45x 1.69x
    o 512 -> 512           27.6    18.6      17.7    1.48x 1.56x
    gate_up 512 -> 2816   121.1    67.4      43.0    1.80x 2.82x
    down 1408 -> 512       58.4    35.1      23.9    1.66x 2.44x
    lm_head 512 -> 32000   7900    7997      6992    0.99x 1.13x
    ===================  ======  ======  ==========  ===========

(a second run: 1.4-1.9x for int8 and 1.5-2.9x for int4 on the layer projections; lm_head within
noise of fp32). At batch 8 the int4 kernel stayed ahead (1.6-1.9x on qkv, o, down) and int8 was at
1.1-1.3x, with gate_up and lm_head inconclusive under the load. Fusing pays for the quantized
kernels: q/k/v as one int8 matrix took 18.5 us against 41.9 us as three calls, gate/up 31.4 against
45.0 (int4: 18.7/41.7 and 31.0/42.2), so the modules always hold the fused matrix. Kernel speed
on GPU is not measured (no GPU in this session).
"""

from lmstack.infer.quant._awq import AWQResult, awq_quantize, calibration_tokens
from lmstack.infer.quant._checkpoint import (
    QuantSpec,
    is_quantized_checkpoint,
    load_quantized,
    quantization_spec,
    save_quantized,
)
from lmstack.infer.quant._linear import WeightOnlyLinear, int4_cpu_supported
from lmstack.infer.quant._rtn import quantize_model

__all__ = [
    "AWQResult",
    "QuantSpec",
    "WeightOnlyLinear",
    "awq_quantize",
    "calibration_tokens",
    "int4_cpu_supported",
    "is_quantized_checkpoint",
    "load_quantized",
    "quantization_spec",
    "quantize_model",
    "save_quantized",
]
