"""Shared fixtures for lmstack-train tests: a BPE tokenizer trained here, data-file writers, tiny models."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lmstack.core import Tokenizer, train_bpe_tokenizer

# pytest's importlib mode puts no test folder on sys.path; helpers beside the tests
# (``_preference_rows``) are imported by name.
_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_VOCABULARY = """
the a an of to and in is was for on with as by at from that this it be are were can will hello world
question answer system user assistant tool weather city paris london rain sun river mountain number one
two three four five six seven eight nine ten plus minus equals what where when who why how please thank
you sure here is your result the capital of invented land called zorbia has a river named quill and
mountains known as the teeth
"""
_WORDS = tuple(_VOCABULARY.split())


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 30))]
        texts.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]) + " 12+30=42, é, 你好")
    return texts


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE (vocab 400) trained here, with the InternLM2 ChatML template and Llama-3 tokens."""
    return train_bpe_tokenizer(
        iter(_corpus()),
        vocab_size=400,
        special_tokens=(
            "<s>",
            "</s>",
            "<unk>",
            "<pad>",
            "<|im_start|>",
            "<|im_end|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
    )


@pytest.fixture(scope="session")
def llama3_template() -> str:
    """A Llama-3-style chat template (header tokens, ``<|eot_id|>`` ends a turn, content trimmed)."""
    return LLAMA3_STYLE_TEMPLATE


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """``write_jsonl(name, records, raw_lines=None)`` -> a JSON Lines file under tmp_path."""

    def write(name: str, records: list[Any], extra_lines: dict[int, str] | None = None) -> Path:
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        for index, text in sorted((extra_lines or {}).items()):
            lines.insert(index, text)
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


def make_chats(n: int, seed: int = 0, *, max_turns: int = 3, system: bool = True) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    records = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if system and rng.random() < 0.5:
            messages.append({"role": "system", "content": sentence(2, 6)})
        for _ in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": sentence(2, 12)})
            messages.append({"role": "assistant", "content": sentence(1, 40)})
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="session")
def chats() -> Callable[..., list[dict[str, Any]]]:
    """``chats(n, seed=0, max_turns=3, system=True)`` -> OpenAI-messages records of varied lengths."""
    return make_chats


@pytest.fixture
def tiny_model() -> Callable[[int], Any]:
    """``tiny_model(vocab_size)`` -> a small random fp32 :class:`lmstack.core.CausalLM` (seeded)."""
    import torch

    from lmstack.core import CausalLM, ModelConfig

    def build(vocab_size: int) -> Any:
        torch.manual_seed(0)
        config = ModelConfig(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return CausalLM(config, dtype=torch.float32)

    return build


# ``python -c STOP_AFTER N lmstack-args...``: runs ``lmstack ARGS...`` and stops itself (SIGSTOP) once
# step N has been logged, so a test can SIGKILL it at a known step whatever the machine's speed.
STOP_AFTER = """
import os, signal, sys
from lmstack.core._cli import main
from lmstack.train import _loop

stop_after, log = int(sys.argv[1]), _loop._Training.log

def log_then_stop(self, record):
    log(self, record)
    if record["step"] == stop_after:
        os.kill(os.getpid(), signal.SIGSTOP)

_loop._Training.log = log_then_stop
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="session")
def stop_after_script() -> str:
    """The source of a ``python -c`` program that runs ``lmstack`` and stops itself after a step."""
    return STOP_AFTER


CASES = Path(__file__).parent / "parallel_cases"


def _load_driver(name: str) -> ModuleType:
    """A torchrun driver of ``parallel_cases/`` loaded as a module (``module.__file__``: the script)."""
    spec = importlib.util.spec_from_file_location(name, CASES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def layout_driver() -> ModuleType:
    """The driver of the ``parallel:`` layout tests (``train_layouts.py``).

    Its ``run_case`` is also the tests' one-process reference.
    """
    return _load_driver("train_layouts")


@pytest.fixture(scope="session")
def recipe_driver() -> ModuleType:
    """The driver of the preference and LoRA recipes under layouts (``recipe_layouts.py``)."""
    return _load_driver("recipe_layouts")
