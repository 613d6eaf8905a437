"""Writing :class:`~lmstack.core.model.CausalLM` as a Hugging Face checkpoint directory."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lmstack.core._atomic import atomic_directory
from lmstack.core._errors import CheckpointError
from lmstack.core.checkpoint._load import INDEX_NAME, SINGLE_NAME
from lmstack.core.model import CausalLM

__all__ = ["parse_size", "save_pretrained"]

logger = logging.getLogger(__name__)

# Files a previous save wrote that a new save replaces (never carried over from an existing directory).
_WEIGHT_FILES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json)$"
)


class _SavesPretrained(Protocol):
    def save_pretrained(self, path: str | os.PathLike[str]) -> None: ...


def parse_size(size: int | str) -> int:
    """Parse a byte size such as ``5GB``, ``500MB``, ``2GiB`` or an integer."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(
        r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"), flags=re.IGNORECASE
    )
    if not m:
        raise CheckpointError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB' or a number of bytes.")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def _generation_config(model: CausalLM) -> dict[str, Any]:
    cfg = model.config
    return {k: v for k, v in {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                              "pad_token_id": cfg.pad_token_id}.items() if v is not None}  # fmt: skip


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer: _SavesPretrained | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    InternLM2 models are written in the Llama layout (``model_type: llama``), which transformers
    implements natively. The directory is replaced atomically (see
    :func:`~lmstack.core.atomic_directory`): until the new checkpoint is complete the old one stays
    complete and loadable, and a failed save leaves it untouched. Other files already in an existing
    directory (a tokenizer, a README) are kept; the old weights, index and config are not.

    Args:
        model: The model to save.
        path: Target directory.
        max_shard_size: Largest shard, in bytes or as ``"5GB"``; bigger models are sharded with a
            ``model.safetensors.index.json``.
        dtype: Cast floating-point weights to this dtype on the way out (one shard at a time).
        tokenizer: Optionally, a tokenizer to save alongside (anything with ``save_pretrained``).
        progress: Show a progress bar (default: only on an interactive terminal).

    Returns:
        The checkpoint directory.
    """
    target = Path(path).absolute()
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory.")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding

    # Plan shards in a stable order; each shard's tensors are written straight from CPU model memory.
    shards: list[list[str]] = [[]]
    sizes = [0]
    out_dtype = {}
    for name, tensor in state.items():
        dt = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out_dtype[name] = dt
        nbytes = tensor.numel() * dt.itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    with atomic_directory(target, keep=lambda name: _WEIGHT_FILES.match(name) is None) as tmp:
        weight_map: dict[str, str] = {}
        bar = tqdm(total=sum(sizes), desc=f"Saving {target.name}", unit="B", unit_scale=True,
                   disable=None if progress is None else not progress)  # fmt: skip
        for file, keys, size in zip(names, shards, sizes, strict=True):
            # No-ops for contiguous CPU tensors already in the wanted dtype; one shard's copies otherwise.
            tensors = {k: state[k].detach().to("cpu", out_dtype[k]).contiguous() for k in keys}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
            bar.update(size)
            weight_map.update(dict.fromkeys(keys, file))
        bar.close()
        total = sum(sizes)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(tmp / INDEX_NAME, index)
        saved_dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
        config = model.config.replace(dtype=str(saved_dtype).replace("torch.", "") if saved_dtype else None)
        _write_json(tmp / "config.json", config.to_dict())
        if not (target / "generation_config.json").exists():  # an existing one is kept as it is
            _write_json(tmp / "generation_config.json", _generation_config(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved %s (%d shard(s), %.1f MB)", target, n, total / 1e6)
    return target


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
