"""Model fingerprints: the part of the cache key that says which model answered.

The choice, per kind of model:

* **a local model directory** (``LLM`` built from a path): sha256 over the *content* of the files that
  decide the answers — ``config.json``, ``generation_config.json``, the tokenizer files and chat
  template, the safetensors weights (and their index) — plus the dtype the engine runs in. A copy of
  the same checkpoint elsewhere shares the cache; a finetune with the same shapes (identical
  safetensors headers, possibly the same sizes and mtimes after a copy) does not. Reading the weights
  once costs about a second per GB, small beside an evaluation; sizes and mtimes alone were rejected
  because ``cp`` changes mtimes and an in-place re-save can keep sizes.
* **an ``LLM`` object** (no path known): sha256 over its model config, every parameter's bytes and
  the tokenizer's vocabulary — the same guarantee, from memory.
* **a ``TransformersLLM``** (the reference model): its directory, hashed as above with
  ``transformers:<dtype>`` as the extra, so it never shares cached answers with ``LLM`` on the same
  checkpoint (different arithmetic, answers that may differ in the last bits).
* **a ``RemoteLLM``**: its base URL and the served model's name. The ``/v1/models`` card is not
  hashed: servers put their start time in it (``created``), which would orphan the cache on every
  restart. Pass ``fingerprint=`` to :func:`lmstack.eval.evaluate` when the weights behind a name change.
* **any other LLM-protocol object**: no safe default exists; ``fingerprint=`` is required.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmstack.eval._errors import EvalError
from lmstack.eval.runner._cache import ModelInfo

__all__ = ["fingerprint_dir", "model_info"]

# Files of a Hugging Face model directory that change what the model answers.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_BLOCK = 1 << 20


def fingerprint_dir(path: str | Path, *, extra: str = "") -> str:
    """sha256 (hex) over the content of a model directory's config, tokenizer and weight files.

    Args:
        path: The model directory.
        extra: More text to hash in (the dtype the weights run in).

    Raises:
        EvalError: The directory has no ``config.json``.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise EvalError(f"{root} is not a model directory (no config.json)")
    names = [n for n in _MODEL_FILES if (root / n).is_file()]
    names += sorted(
        p.name for p in root.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))
    )
    digest = hashlib.sha256(f"lmstack-model-dir:{extra}\n".encode())
    for name in names:
        digest.update(f"{name}\n".encode())
        with (root / name).open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _fingerprint_llm_object(llm: Any) -> str:
    import torch

    engine = llm.engine
    digest = hashlib.sha256(b"lmstack-llm-object\n")
    config = getattr(engine.model, "config", None)
    digest.update(repr(config).encode())
    for name, tensor in sorted(engine.model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    vocab = llm.tokenizer.get_vocab() if hasattr(llm.tokenizer, "get_vocab") else {}
    digest.update(json.dumps(vocab, sort_keys=True).encode())
    return digest.hexdigest()


def model_info(
    llm: Any, *, path: str | Path | None = None, name: str | None = None, fingerprint: str | None = None
) -> ModelInfo:
    """Name, fingerprint and kind of a model behind the LLM protocol.

    Args:
        llm: The model (``LLM``, ``RemoteLLM`` or another LLM-protocol object).
        path: The directory ``llm`` was loaded from, when known (hashed instead of the weights in memory).
        name: Overrides the readable name.
        fingerprint: Overrides the fingerprint (required for other LLM-protocol objects).

    Raises:
        EvalError: No fingerprint can be derived for ``llm``.
    """
    from lmstack.eval._reference import TransformersLLM
    from lmstack.infer import LLM, RemoteLLM

    if isinstance(llm, TransformersLLM):
        dtype = str(llm.dtype).removeprefix("torch.")
        fp = fingerprint or fingerprint_dir(llm.path, extra=f"transformers:{dtype}")
        return ModelInfo(name or llm.path.name, fp, "reference")
    if isinstance(llm, RemoteLLM):
        served = llm.model or _only_model(llm)
        fp = fingerprint or hashlib.sha256(f"lmstack-remote:{llm.base_url}\n{served}".encode()).hexdigest()
        return ModelInfo(name or served, fp, "remote")
    if isinstance(llm, LLM):
        dtype = str(llm.engine.dtype)
        if fingerprint is None:
            fingerprint = (
                fingerprint_dir(path, extra=dtype) if path is not None else _fingerprint_llm_object(llm)
            )
        return ModelInfo(name or (Path(path).name if path is not None else "LLM"), fingerprint, "local")
    if fingerprint is None:
        raise EvalError(
            f"cannot fingerprint a {type(llm).__name__}: pass fingerprint=... (a string that changes "
            "whenever the model's answers could) so that its cached answers are never mixed up"
        )
    return ModelInfo(name or type(llm).__name__, fingerprint, "custom")


def _only_model(llm: Any) -> str:
    names = llm.models()
    if len(names) != 1:
        raise EvalError(
            f"{llm.base_url} serves {len(names)} models ({', '.join(map(repr, names)) or 'none'}); "
            "name the one to evaluate: RemoteLLM(url, model=...)"
        )
    return str(names[0])
