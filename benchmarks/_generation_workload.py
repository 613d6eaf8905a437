"""The seeded mixed workload of the generation benchmark, and the two systems it runs on.

128 requests, prompt lengths 16-512, output lengths 16-256 (uniform, seeded), on a random-init
llama-type model of ~40M parameters. Every request generates exactly its output length
(``ignore_eos``), so both systems produce the same number of useful tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.core import CausalLM, ModelConfig, save_pretrained

NUM_REQUESTS = 128
VOCAB = 16000


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def workload(seed: int = 0, n: int = NUM_REQUESTS) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request([rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 512))], rng.randint(16, 256))
        for _ in range(n)
    ]


def build_model(path: Path) -> Path:
    """Save a ~40M-parameter random model (no tokenizer needed: prompts are token ids)."""
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    save_pretrained(CausalLM(config), path)
    return path


def run_lmstack(
    path: Path, requests: list[Request], **engine_options: object
) -> tuple[float, int, list[list[int]]]:
    """Serve all requests at once on lmstack's engine; return (seconds, output tokens, outputs)."""
    from lmstack.core import Tokenizer, load_pretrained
    from lmstack.infer import LLM, SamplingParams

    model = load_pretrained(path, dtype=torch.float32)
    tokenizer = _id_tokenizer()
    options = {"kv_cache_memory": "3GB", **engine_options}  # room for every request at once
    llm = LLM(model, tokenizer, **options)
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    assert isinstance(tokenizer, Tokenizer)
    return seconds, sum(len(t) for t in tokens), tokens


def run_transformers(
    path: Path, requests: list[Request], batch_size: int
) -> tuple[float, int, list[list[int]]]:
    """transformers ``generate`` in static, left-padded batches of ``batch_size`` in arrival order."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        longest = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, longest - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, longest - len(r.prompt) :] = 1
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch), do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        outputs.extend(out[i, longest : longest + r.max_tokens].tolist() for i, r in enumerate(batch))
    seconds = time.perf_counter() - start
    return seconds, sum(len(t) for t in outputs), outputs


def _id_tokenizer() -> object:
    """A byte-level BPE tokenizer sized to the model, only for decoding (the prompts are ids)."""
    from lmstack.core import train_bpe_tokenizer

    return train_bpe_tokenizer(iter(["benchmark text " * 20]), vocab_size=300, min_frequency=1)
