"""Fixtures for lmstack-eval tests: a tiny random model with a trained tokenizer, and small task files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, save_pretrained, train_bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_CORPUS_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial zebras "
    "red green blue cat bird fish one two three"
)
WORDS = _CORPUS_WORDS.split(" ")


def sentence(rng: random.Random, low: int = 3, high: int = 12) -> str:
    """Words of the tokenizer's corpus, so that text tokenizes into real merges."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-type model (2,048-token context) whose weights are scaled up so that choices have clear
    margins (no near-ties that float rounding could flip); transformers loads it too."""
    rng = random.Random(0)
    tokenizer = train_bpe_tokenizer(
        iter([sentence(rng) + "." for _ in range(400)]), vocab_size=300, min_frequency=2
    )
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_pretrained(model, out, tokenizer=tokenizer)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def task_files(tmp_path: Path) -> dict[str, Path]:
    """Three lm-eval task YAML files over local jsonl data: multiple choice, generation, rolling."""
    rng = random.Random(1)
    mc = []
    for i in range(24):
        choices = [sentence(rng, 1, 4) for _ in range(4)]
        mc.append({"question": sentence(rng), "choices": choices, "label": i % 4})
    gen = [
        {"question": sentence(rng), "answer": rng.choice(["fox", "dog", " the", "cat cat"])}
        for _ in range(12)
    ]
    text = [{"text": sentence(rng, 20, 80)} for _ in range(10)]
    write_jsonl(tmp_path / "mc.jsonl", mc)
    write_jsonl(tmp_path / "gen.jsonl", gen)
    write_jsonl(tmp_path / "text.jsonl", text)
    files = {
        "mc": (
            "task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: mc.jsonl}\n"
            "test_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: label\ndoc_to_choice: choices\n'
            "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        ),
        "gen": (
            "task: toy_gen\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: gen.jsonl}\n"
            "test_split: test\noutput_type: generate_until\n"
            'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: answer\n'
            'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
            "metric_list:\n  - {metric: exact_match, ignore_case: true}\n"
        ),
        "rolling": (
            "task: toy_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: text.jsonl}\n"
            'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
            "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n"
        ),
    }
    paths = {}
    for name, text_ in files.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text_)
    return paths


@pytest.fixture(scope="session")
def make_sentence():
    """``make_sentence(rng, low, high)``: a sentence of the corpus's words.

    A fixture because test modules cannot import conftest (importlib import mode)."""
    return sentence


@pytest.fixture(scope="session")
def write_rows():
    """``write_rows(path, rows)``: write rows as JSON lines."""
    return write_jsonl
