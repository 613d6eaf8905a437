"""The engine-speed benchmark's model, GGUF writer and the three systems it times (issue 14).

One seeded random ~56M-parameter llama (hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1408, vocab
32,000, untied lm head), fp32, two threads, token-id prompts, run by lmstack's ``LLM``, transformers
``generate`` and llama.cpp (llama-cpp-python on an f32 GGUF of the same weights, written here).

Decode speed is measured the same way for every system: the time for ``1 + n`` new tokens minus the
time for 1 (prefill and the first token), so ``n / difference`` is the steady decode rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.core import CausalLM, ModelConfig, save_pretrained

THREADS = 2
VOCAB = 32000
SEED = 0


def config() -> ModelConfig:
    """The benchmark model: 56.4M parameters (16.4M embedding, 16.4M lm head, 23.6M in the layers)."""
    return ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip


def build_model(path: Path) -> tuple[Path, int]:
    """Save the seeded random model in the Hugging Face layout; return (path, number of parameters)."""
    torch.manual_seed(SEED)
    model = CausalLM(config())
    save_pretrained(model, path)
    return path, sum(p.numel() for p in model.parameters())


def prompts(n: int, length: int, seed: int = SEED) -> list[list[int]]:
    """``n`` seeded random token-id prompts of ``length`` tokens (ids 3.. avoid the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g).tolist()


# -- GGUF ------------------------------------------------------------------------------------------------
def write_gguf(model_dir: Path, out: Path) -> Path:
    """Write the HF-layout checkpoint in ``model_dir`` as an f32 GGUF llama.cpp loads as ``llama``.

    lmstack-core's :func:`~lmstack.core.export_gguf` does the work; the vocabulary is its placeholder
    SentencePiece one (special tokens, the 256 byte tokens, then ``<tok_i>``): prompts are token ids,
    so only its size matters.
    """
    from lmstack.core import export_gguf

    return export_gguf(model_dir, out, type="f32", placeholder_vocab=True, name="lmstack-bench-56m")


# -- the three systems ------------------------------------------------------------------------------------
class LmstackRunner:
    """lmstack's ``LLM`` on the checkpoint (fp32)."""

    def __init__(self, path: Path, max_num_seqs: int = 64) -> None:
        from lmstack.core import load_pretrained, train_bpe_tokenizer
        from lmstack.infer import LLM

        model = load_pretrained(path, dtype=torch.float32)
        # Only for decoding the (ignored) output text: the prompts are token ids.
        tokenizer = train_bpe_tokenizer(iter(["benchmark text " * 20]), vocab_size=300, min_frequency=1)
        # max_num_seqs=1: a one-sequence engine, whose weights take the "gemv" layout (see lmstack-core).
        self.llm = LLM(model, tokenizer, kv_cache_memory="2GB", max_num_seqs=max_num_seqs)
        self.weight_layout = model.inference_layout

    def generate(self, batch: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
        from lmstack.infer import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        outs = self.llm.generate(list(batch), params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    def close(self) -> None:
        self.llm.close()


class TransformersRunner:
    """transformers ``generate`` (greedy, EOS off) on the same checkpoint."""

    def __init__(self, path: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None

    def generate(self, batch: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(batch)  # equal lengths: no padding
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    def logits(self, prompt: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([prompt])).logits[0].numpy()


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python on the f32 GGUF, one sequence at a time."""

    def __init__(self, gguf_path: Path, n_ctx: int = 1024, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
            logits_all=logits_all, verbose=False, seed=SEED,
        )  # fmt: skip

    def generate(self, batch: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
        outs = []
        for prompt in batch:
            self.llm.reset()
            tokens: list[int] = []
            # top_k=1: greedy; the generator does not stop at EOS, so every prompt gets new_tokens.
            for token in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            outs.append(tokens)
        return outs

    def logits(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(prompt)
        return np.array(self.llm.scores[: len(prompt)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


# -- measurements -------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def decode_rate(runner: Any, prompt: list[int], new_tokens: int, repeats: int = 2) -> tuple[float, list[int]]:
    """Steady single-stream decode tok/s (best of ``repeats``) and the greedy tokens generated."""
    runner.generate([prompt], 2)  # warm-up
    best = 0.0
    tokens: list[int] = []
    for _ in range(repeats):
        first, _ = timed(lambda: runner.generate([prompt], 1))
        full, out = timed(lambda: runner.generate([prompt], new_tokens + 1))
        tokens = out[0]
        best = max(best, new_tokens / max(full - first, 1e-9))
    return best, tokens


def batch_rate(runner: Any, batch: Sequence[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Output tok/s generating ``new_tokens`` for every prompt of ``batch`` at once (prefill included)."""
    runner.generate([batch[0]], 2)  # warm-up
    seconds, out = timed(lambda: runner.generate(batch, new_tokens))
    return len(batch) * new_tokens / seconds, out


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best fp32 ``n x n`` matmul rate torch reaches on the current thread count, in GFLOP/s."""
    g = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        seconds, _ = timed(lambda: torch.mm(a, b))
        best = min(best, seconds)
    return 2 * n**3 / best / 1e9
