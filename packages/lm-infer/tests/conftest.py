"""Fixtures for lmstack-infer tests: a tiny random model with a real trained tokenizer, on disk.

pytest's importlib mode puts no test folder on sys.path; helper modules beside the tests
(``live_server``) are importable by name because this folder is added here.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, save_pretrained, train_bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton builds its language for the interpreter only if this is set before triton is first imported;
# the kernel tests run every kernel on the CPU through it. The engine's "auto" still picks torch here.
os.environ.setdefault("TRITON_INTERPRET", "1")
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jovial",
    "zebras",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "." for _ in range(n)]


def _tiny_model(out: Path, max_position_embeddings: int) -> Path:
    tokenizer = train_bpe_tokenizer(iter(corpus()), vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    save_pretrained(model, out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-type model with weights scaled up so greedy choices have clear margins (no near-ties
    that float rounding could flip), and a byte-level BPE tokenizer trained on a small corpus."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", 256)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a 2048-token context, for prompts and generations over 256 tokens."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-2k", 2048)
