"""Loading Hugging Face checkpoint directories into :class:`~lmstack.core.model.CausalLM`.

Tensors are read with the ``safetensors`` library (``safe_open``). lmstack had its own streaming
reader and writer until ``benchmarks/test_load_memory.py`` measured both on the same files (a 380 MiB
fp32 llama in 5 shards, a shared 2-core CPU machine) and found no gain worth keeping: the same peak
memory with every weight resident (1.20x the weights for ours, 1.23x for the library's), and load and
save times within run-to-run noise of each other (load 1.3-3.5 s against 1.2-1.8 s, save 1.1-1.4 s
against 0.8-1.4 s over four runs). That holds for ``safetensors>=0.8``, whose ``save_file`` writes
straight from tensor memory; releases of 2024 built each tensor's bytes first (safetensors issue 458).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from lmstack.core._config import ModelConfig, load_config
from lmstack.core._errors import CheckpointError
from lmstack.core.checkpoint._layouts import IGNORED_KEYS, map_key, unpack_internlm2_wqkv
from lmstack.core.model import CausalLM

__all__ = ["INDEX_NAME", "SINGLE_NAME", "TensorSpec", "checkpoint_files", "load_pretrained", "tensor_specs"]

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# The safetensors header's dtype names.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

TensorSpec = tuple[torch.dtype, tuple[int, ...]]
"""A stored tensor's dtype and shape."""


@contextlib.contextmanager
def _open(file: Path) -> Iterator[Any]:
    """``safe_open`` with its errors (corrupt, truncated, unreadable) raised as :class:`CheckpointError`."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}; re-download or re-save it.") from exc


def tensor_specs(file: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """The dtype and shape of every tensor in a safetensors file, from its header alone.

    Raises:
        CheckpointError: if the file is missing, corrupt, truncated, or stores a dtype torch lacks.
    """
    specs: dict[str, TensorSpec] = {}
    with _open(Path(file)) as f:
        for name in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
            stored = f.get_slice(name)
            dtype = _DTYPES.get(stored.get_dtype())
            if dtype is None:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has dtype {stored.get_dtype()}, which lmstack cannot load."
                )
            specs[name] = dtype, tuple(stored.get_shape())
    return specs


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index when sharded.

    Raises:
        CheckpointError: if there are no weights, the index is invalid, or a shard it names is missing.
    """
    root = Path(path)
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({exc!r}); re-save the checkpoint."
            ) from exc
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {root} is missing shard(s) {missing} listed in {INDEX_NAME}; "
                "copy or re-download the complete checkpoint."
            )
        return [root / s for s in shards]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if others:
        return [root / p for p in others]
    hint = ""
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        hint = (
            " It holds pickled PyTorch weights: convert them to safetensors first (safetensors is required)."
        )
    raise CheckpointError(
        f"no safetensors weights in {root} (looked for {INDEX_NAME} and {SINGLE_NAME}).{hint}"
    )


def _resolve_dtype(
    dtype: torch.dtype | str | None, config: ModelConfig, first: torch.dtype | None
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) and dtype != "auto" else None
    if name is None and config.dtype is not None:
        name = config.dtype
    if name is not None:
        resolved = getattr(torch, name.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise CheckpointError(
                f"dtype {name!r} is not a floating-point torch dtype (try 'bfloat16' or 'float32')."
            )
        return resolved
    return first if first is not None else torch.float32


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=value.is_floating_point()))


def load_pretrained(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    strict: bool = True,
    progress: bool | None = None,
) -> CausalLM:
    """Load a model from a local Hugging Face checkpoint directory.

    Weights are streamed shard by shard and tensor by tensor into the model, which is built on the
    meta device first, so at no point are two copies of the weights held in memory. Tensors already
    in the wanted dtype on the CPU stay memory-mapped from their file (copy-on-write) until used. InternLM2
    checkpoints (packed ``wqkv``) are converted to the Llama layout on the way in.

    Args:
        path: A directory with ``config.json`` and ``model.safetensors`` or sharded
            ``model-XXXXX-of-YYYYY.safetensors`` files with their index.
        dtype: Parameter dtype (a torch dtype or its name). Default: the checkpoint's declared dtype,
            else the dtype its tensors are stored in.
        device: Where the parameters go; tensors move there one at a time.
        strict: Raise on tensors the model does not know (otherwise log a warning).
        progress: Show a progress bar (default: only on an interactive terminal).

    Returns:
        The model in eval mode.

    Raises:
        ConfigError: if ``config.json`` is missing or invalid.
        CheckpointError: on a missing shard, a corrupt file, a shape mismatch (both shapes named),
            unexpected tensors (when strict) or missing tensors.
    """
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a checkpoint directory" if root.exists() else "does not exist"
        raise CheckpointError(
            f"{root} {what}; pass the directory holding config.json and the safetensors files."
        )
    config = load_config(root)
    files = checkpoint_files(root)
    headers = [(f, tensor_specs(f)) for f in files]
    first = next((dt for _, h in headers for dt, _ in h.values() if dt.is_floating_point), None)
    target_dtype = _resolve_dtype(dtype, config, first)
    device = torch.device(device)

    model = CausalLM(config, device="meta", dtype=target_dtype)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights appear once
    tied = config.tie_word_embeddings
    loaded: set[str] = set()
    unexpected: list[str] = []
    total = sum(len(h) for _, h in headers)
    bar = tqdm(
        total=total,
        desc=f"Loading {root.name}",
        unit="tensor",
        disable=None if progress is None else not progress,
    )
    for file, header in headers:
        with _open(file) as f:
            for key, (_, shape) in header.items():
                bar.update(1)
                targets = map_key(config, key)
                if targets is None or any(
                    t not in expected and not (tied and t == "lm_head.weight") for t in targets
                ):
                    if IGNORED_KEYS.match(key):
                        continue
                    unexpected.append(key)
                    continue
                if tied and targets == ["lm_head.weight"]:
                    continue  # the output projection is the embedding; the copy on disk is redundant
                if len(targets) == 3:
                    want = sum(expected[t][0] for t in targets), *expected[targets[0]][1:]
                else:
                    want = expected[targets[0]]
                if shape != tuple(want):
                    raise CheckpointError(
                        f"shape mismatch for tensor {key!r} in {file.name}: "
                        f"the checkpoint has {list(shape)} "
                        f"but the config ({config.model_type}, {root / 'config.json'}) implies {list(want)}; "
                        "the config and the weights do not belong together."
                    )
                tensor = f.get_tensor(key)
                values = unpack_internlm2_wqkv(config, tensor) if len(targets) == 3 else (tensor,)
                del tensor
                for target, value in zip(targets, values, strict=True):
                    _set_param(model, target, value.to(device=device, dtype=target_dtype))
                    loaded.add(target)
    bar.close()
    if unexpected:
        message = (
            f"checkpoint {root} has tensors this {config.model_type} model does not use: {unexpected[:8]}"
        )
        if len(unexpected) > 8:
            message += f" and {len(unexpected) - 8} more"
        if strict:
            raise CheckpointError(message + "; pass strict=False to ignore them.")
        logger.warning(message)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"checkpoint {root} lacks {len(missing)} tensor(s) the config requires, e.g. {missing[:5]}; "
            "the checkpoint is incomplete or belongs to another architecture."
        )
    model.tie_weights()
    logger.info(
        "loaded %s (%s, %d parameters, %s)", root, config.model_type, model.num_parameters(), target_dtype
    )
    return model.eval()
