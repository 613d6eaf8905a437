"""The trained default model exported to GGUF and run by llama.cpp: lmstack's greedy tokens (issue 15).

The quickstart's trained default model (an earlier ``out/quickstart`` run, ``GGUF_BENCH_MODEL`` /
``GGUF_BENCH_WORLD``, or trained here) is written by ``lmstack convert --to gguf`` as f32, f16 and
q8_0, with its own tokenizer and chat template; llama.cpp (llama-cpp-python) loads each file and
greedy-decodes 20 of the world's held-out questions (as chats, through the GGUF's chat template
rendered by lmstack) for 24 tokens, fed the same prompt ids as lmstack's engine.

Asserted: llama.cpp tokenizes every prompt text as lmstack does; f32 greedy tokens equal lmstack's on
all 20 prompts; f16 on at least 19; q8_0 (weights rounded to 8 bits per block of 32, and llama.cpp's
q8_0 matmuls round the activations to 8 bits too) on at least 15 — measured figures are printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import Tokenizer, export_gguf
from lmstack.infer import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
import _world_model as wm

N_PROMPTS = 20
NEW = 24
MIN_SAME = {"f32": 20, "f16": 19, "q8_0": 15}


@pytest.mark.benchmark
def test_llama_cpp_decodes_the_exported_default_model_like_lmstack(
    benchmark: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp("gguf")
    model_dir, world_dir, source = wm.default_model(tmp, "GGUF_BENCH")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    heldout = [r for r in wm.world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}], add_generation_prompt=True
        )
        for r in heldout[:N_PROMPTS]
    ]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    f: dict[str, Any] = {"model": source, "prompts": len(prompts), "new tokens": NEW}

    def measure() -> None:
        llm = LLM(model_dir, dtype=torch.float32)
        params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.close()
        for kind in ("f32", "f16", "q8_0"):
            path = export_gguf(model_dir, tmp / f"default-{kind}.gguf", type=kind)
            cpp = llama_cpp.Llama(
                model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, type_k=0, type_v=0
            )  # f32 KV cache: only the weights' rounding differs
            f[f"{kind} file MB"] = path.stat().st_size / 1e6
            same_ids = sum(
                cpp.tokenize(t.encode(), add_bos=False, special=True) == p
                for t, p in zip(texts, prompts, strict=True)
            )
            f[f"{kind} prompts tokenized alike"] = same_ids
            same = 0
            for prompt, want in zip(prompts, ours, strict=True):
                cpp.reset()
                got: list[int] = []
                for token in cpp.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                    got.append(token)
                    if len(got) == NEW:
                        break
                same += got == want
            f[f"{kind} greedy equal to lmstack"] = same
            cpp.close()

    benchmark.pedantic(measure, rounds=1, iterations=1)
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", Path(__file__).resolve().parent.parent / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_default_model.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n" + "\n".join(f"  {k:<36} {v}" for k, v in f.items()))
    for kind, least in MIN_SAME.items():
        assert f[f"{kind} prompts tokenized alike"] == len(prompts), f
        assert f[f"{kind} greedy equal to lmstack"] >= least, f
