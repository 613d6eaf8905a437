"""Published model shapes the planner knows by name, and how ``--model`` is resolved.

Each preset is the architecture of a public checkpoint, written from its ``config.json`` (hidden
size, layers, query and key/value heads, feed-forward width, vocabulary): only the shapes matter to
the planner, so no weights are involved. Anything else is read with :func:`lmstack.core.load_config`
from a ``config.json`` file or a model directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmstack.core import ConfigError, ModelConfig, load_config
from lmstack.train.plan._errors import PlanError

__all__ = ["MODEL_PRESETS", "model_preset", "resolve_model"]

logger = logging.getLogger(__name__)


def _shape(
    model_type: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        **extra,
    }


#: name -> ModelConfig fields of published checkpoints (their Hugging Face ``config.json``).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-{7b,13b,70b}-hf
    "llama2-7b": _shape("llama", 4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": _shape("llama", 5120, 40, 40, 40, 13824, 32000),
    "llama2-70b": _shape("llama", 8192, 80, 64, 8, 28672, 32000),
    # meta-llama/Meta-Llama-3-{8B,70B} (Llama 3.1 has the same shapes), Llama-3.1-405B
    "llama3-8b": _shape("llama", 4096, 32, 32, 8, 14336, 128256),
    "llama3-70b": _shape("llama", 8192, 80, 64, 8, 28672, 128256),
    "llama3.1-8b": _shape("llama", 4096, 32, 32, 8, 14336, 128256),
    "llama3.1-70b": _shape("llama", 8192, 80, 64, 8, 28672, 128256),
    "llama3.1-405b": _shape("llama", 16384, 126, 128, 8, 53248, 128256),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": _shape("mistral", 4096, 32, 32, 8, 14336, 32000),
    # Qwen/Qwen2-7B (q, k, v biases)
    "qwen2-7b": _shape("qwen2", 3584, 28, 28, 4, 18944, 152064),
    # internlm/internlm-7b (the first InternLM: biases on q, k, v and o), internlm2-7b / 20b,
    # internlm2_5-7b (same shapes as internlm2-7b)
    "internlm-7b": _shape("llama", 4096, 32, 32, 32, 11008, 103168, qkv_bias=True),
    "internlm2-7b": _shape("internlm2", 4096, 32, 32, 8, 14336, 92544),
    "internlm2-20b": _shape("internlm2", 6144, 48, 48, 8, 16384, 92544),
    "internlm2.5-7b": _shape("internlm2", 4096, 32, 32, 8, 14336, 92544),
}


def model_preset(name: str) -> ModelConfig:
    """The :class:`~lmstack.core.ModelConfig` of a published model by name (see :data:`MODEL_PRESETS`).

    Raises:
        PlanError: The name is not a preset (the message lists them).
    """
    key = name.strip().lower()
    if key not in MODEL_PRESETS:
        raise PlanError(
            f"unknown model preset {name!r}; use one of {', '.join(sorted(MODEL_PRESETS))}, "
            "or give a config.json file or a model directory."
        )
    return ModelConfig(**MODEL_PRESETS[key])


def resolve_model(spec: str) -> tuple[str, ModelConfig]:
    """``--model``: a preset name, a ``config.json`` file or a model directory.

    Returns:
        A display name and the model's config.

    Raises:
        PlanError: Neither a preset nor a readable config (the message says which was tried).
    """
    path = Path(spec)
    if path.exists():
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise PlanError(f"--model {spec}: {exc}") from exc
        name = path.name if path.is_dir() else path.parent.name or path.name
        return name, config
    if "/" in spec or spec.endswith(".json"):
        raise PlanError(f"--model {spec}: no such file or directory (nor a preset name).")
    return spec.strip().lower(), model_preset(spec)
