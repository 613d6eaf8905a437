"""Writing :class:`~lmstack.core.model.CausalLM` as a Hugging Face checkpoint directory."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from lmstack.core._errors import CheckpointError
from lmstack.core.checkpoint._load import INDEX_NAME, SINGLE_NAME
from lmstack.core.checkpoint._safetensors import write_safetensors
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
    implements natively. The directory is assembled in a temporary sibling and moved into place at
    the end, so a failed save never leaves a half-written checkpoint; other files already in an
    existing directory (a tokenizer, a README) are kept.

    Args:
        model: The model to save.
        path: Target directory.
        max_shard_size: Largest shard, in bytes or as ``"5GB"``; bigger models are sharded with a
            ``model.safetensors.index.json``.
        dtype: Cast floating-point weights to this dtype on the way out (one tensor at a time).
        tokenizer: Optionally, a tokenizer to save alongside (anything with ``save_pretrained``).
        progress: Show a progress bar (default: only on an interactive terminal).

    Returns:
        The checkpoint directory.
    """
    target = Path(path).absolute()
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding

    # Plan shards in a stable order; each shard's tensors are written straight from model memory.
    shards: list[list[str]] = [[]]
    sizes = [0]
    out_dtype = {}
    for name, tensor in state.items():
        dt = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out_dtype[name] = dt
        nbytes = tensor.numel() * torch.empty((), dtype=dt).element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        bar = tqdm(total=sum(sizes), desc=f"Saving {target.name}", unit="B", unit_scale=True,
                   disable=None if progress is None else not progress)  # fmt: skip
        for file, keys in zip(names, shards, strict=True):
            tensors = {k: state[k].detach().to(out_dtype[k]) for k in keys}
            total += write_safetensors(tmp / file, tensors, metadata={"format": "pt"})
            del tensors
            bar.update(
                sum(state[k].numel() * torch.empty((), dtype=out_dtype[k]).element_size() for k in keys)
            )
            weight_map.update(dict.fromkeys(keys, file))
        bar.close()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        saved_dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
        config = model.config.replace(dtype=str(saved_dtype).replace("torch.", "") if saved_dtype else None)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        gen = tmp / "generation_config.json"
        if not (target / gen.name).exists():
            gen.write_text(json.dumps(_generation_config(model), indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if target.exists():
            if not target.is_dir():
                raise CheckpointError(f"{target} exists and is not a directory.")
            # Carry over what this save does not replace (tokenizer, README, ...), then swap.
            for item in target.iterdir():
                if _WEIGHT_FILES.match(item.name) or (tmp / item.name).exists():
                    continue
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, tmp / item.name)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "ckpt")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(target, 0o755)  # mkdtemp creates 0700 directories
    logger.info("saved %s (%d shard(s), %.1f MB)", target, n, total / 1e6)
    return target
