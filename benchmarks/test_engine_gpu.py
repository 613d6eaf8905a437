"""Engine decode speed on a GPU with and without lmstack's Triton kernels (issue 15); needs CUDA.

Ready to run in one call when a GPU is lent (not run in the session that wrote it: no GPU there)::

    .venv/bin/python -m pytest benchmarks/test_engine_gpu.py benchmarks/test_kernels_gpu.py \
        benchmarks/test_kernels_gpu_ops.py -m gpu -s -q

One seeded random ~1.1B-parameter llama (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 5632, vocab
32,000), fp16, built on the GPU. ``LLM`` decodes 128 greedy tokens after a 128-token prompt, at batch 1
and batch 32, for each of:

* ``kernels="torch"`` (torch's ops and the engine's torch paged attention),
* ``kernels="triton"`` (RMSNorm, rotary, SiLU-mul, paged KV write and split-K decode attention),
* ``kernels="triton"`` with an int8 KV cache,
* ``kernels="triton"`` with int4 weights (``quantize_model`` RTN, groups of 128: the W4A16 kernel).

It prints output tok/s (prefill included, after a warm-up call that compiles the kernels), the ratios
to the torch path, and the number of batch-1 greedy tokens equal to the torch path's, with the GPU's
name; it writes ``.benchmarks/engine_gpu.json``. Asserted: the Triton path's greedy tokens agree with
torch's for at least the first 16 tokens (fp16 rounding may flip a near-tie later).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

PROMPT, NEW = 128, 128
BATCHES = (1, 32)


def _model() -> Any:
    from lmstack.core import CausalLM, ModelConfig

    config = ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config, device="cuda", dtype=torch.float16)
    model.reset_parameters(std=0.02)
    return model.eval()


def _tokenizer() -> Any:
    from lmstack.core import train_bpe_tokenizer

    return train_bpe_tokenizer(iter(["benchmark text " * 20]), vocab_size=300, min_frequency=1)


def _run(label: str, options: dict[str, Any], int4: bool, prompts: list[list[int]]) -> dict[str, Any]:
    from lmstack.infer import LLM, SamplingParams

    model = _model()
    if int4:
        from lmstack.infer.quant import quantize_model

        quantize_model(model, "rtn", bits=4, group_size=128)
    llm = LLM(model, _tokenizer(), kv_cache_memory="8GB", max_num_seqs=64, **options)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up: Triton compiles its kernels here
    out: dict[str, Any] = {}
    for batch in BATCHES:
        torch.cuda.synchronize()
        start = time.perf_counter()
        got = llm.generate(prompts[:batch], params, use_tqdm=False)
        torch.cuda.synchronize()
        out[f"batch {batch} tok/s"] = batch * NEW / (time.perf_counter() - start)
        if batch == 1:
            out["tokens"] = got[0].outputs[0].token_ids
    llm.close()
    del llm, model
    torch.cuda.empty_cache()
    print(f"{label:<28}" + "".join(f"{k}: {v:9.1f}   " for k, v in out.items() if k.endswith("tok/s")))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decode_with_and_without_kernels() -> None:
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 32000, (max(BATCHES), PROMPT), generator=g).tolist()
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; prompt {PROMPT}, new {NEW}")
    int8_kv = {"kernels": "triton", "kv_cache_dtype": "int8"}
    runs = {
        "torch": _run("torch", {"kernels": "torch"}, False, prompts),
        "triton": _run("triton", {"kernels": "triton"}, False, prompts),
        "triton + int8 KV": _run("triton + int8 KV", int8_kv, False, prompts),
        "triton + int4 weights": _run("triton + int4 weights", {"kernels": "triton"}, True, prompts),
    }
    base = runs["torch"]
    figures: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for label, run in runs.items():
        same = next(
            (i for i, (a, b) in enumerate(zip(run["tokens"], base["tokens"], strict=True)) if a != b), NEW
        )
        figures[label] = {k: v for k, v in run.items() if k != "tokens"} | {
            "same greedy tokens as torch": same
        }
        for batch in BATCHES:
            ratio = run[f"batch {batch} tok/s"] / base[f"batch {batch} tok/s"]
            figures[label][f"batch {batch} vs torch"] = ratio
        print(f"{label:<28}same greedy tokens as torch: {same}/{NEW}; " + ", ".join(
            f"batch {b}: {figures[label][f'batch {b} vs torch']:.2f}x" for b in BATCHES))  # fmt: skip
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", Path(__file__).resolve().parent.parent / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_gpu.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert figures["triton"]["same greedy tokens as torch"] >= 16, figures
