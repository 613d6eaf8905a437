"""Shared helpers for lmstack-core tests: tiny random models built in the test, never downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# pytest's importlib mode puts no test folder on sys.path; helpers beside the tests (``_torchrun``)
# are imported as plain modules.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_raw_config(model_type: str = "llama", **overrides: Any) -> dict[str, Any]:
    """A config.json dictionary for a tiny model with deliberately odd sizes."""
    raw: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 68,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    raw.update(overrides)
    return raw


def hf_model_from_raw(raw: dict[str, Any], seed: int = 0) -> Any:
    """A random-init transformers model (eager attention: an independent reference) for a config dict."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**raw)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    # Random biases and norm weights too, so a wrong bias or norm placement cannot hide behind zeros/ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model.eval()


@pytest.fixture
def tiny_config() -> Any:
    """``tiny_config(model_type, **overrides)`` -> a config.json dict for a tiny model."""
    return tiny_raw_config


@pytest.fixture
def hf_model() -> Any:
    """``hf_model(raw, seed=0)`` -> a random transformers model (eager attention) for a config dict."""
    return hf_model_from_raw
