"""lmstack-core's own command-line verbs: ``lmstack inspect`` and ``lmstack convert`` (HF or GGUF).

They are registered through the ``lmstack.commands`` entry-point group like any other layer's verbs.
The checkpoint and model code is imported inside the commands, when one runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from lmstack.core._errors import CheckpointError

__all__ = ["count_safetensors_parameters", "register_convert", "register_inspect"]

logger = logging.getLogger(__name__)

# Files a converted checkpoint takes along from the source, over anything `save_pretrained` wrote
# (its generation_config.json has only the special token ids; the source's may set sampling defaults).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenization_*.py",  # remote-code tokenizers (InternLM2) that tokenizer_config.json points at
)


def count_safetensors_parameters(directory: str | os.PathLike[str]) -> tuple[int, dict[str, int], int]:
    """Count a checkpoint's parameters from its safetensors headers, without reading any weights.

    Args:
        directory: A Hugging Face checkpoint folder.

    Returns:
        The number of parameters stored (a tied embedding counts once, as it is stored once), the
        number of parameters per dtype (``"bfloat16"``, ``"float32"``...), and the number of files read.

    Raises:
        CheckpointError: If the folder has no safetensors weights or a header is corrupt.
    """
    from lmstack.core.checkpoint import checkpoint_files, tensor_specs

    files = checkpoint_files(directory)
    by_dtype: Counter[str] = Counter()
    for file in files:
        for dtype, shape in tensor_specs(file).values():
            by_dtype[str(dtype).removeprefix("torch.")] += math.prod(shape)
    return sum(by_dtype.values()), dict(sorted(by_dtype.items())), len(files)


def _run_inspect(args: argparse.Namespace) -> int:
    from lmstack.core import load_config

    path = Path(args.path)
    config = load_config(path)
    parameters, by_dtype, n_files = count_safetensors_parameters(path if path.is_dir() else path.parent)
    rope = config.rope_scaling
    report: dict[str, Any] = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "rope_scaling": None if rope is None else {"rope_type": rope.rope_type, "factor": rope.factor},
        "vocab_size": config.vocab_size,
        "parameters": parameters,
        "parameters_by_dtype": by_dtype,
        "safetensors_files": n_files,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rope_text = "none" if rope is None else f"{rope.rope_type} (factor {rope.factor:g})"
    dtypes = ", ".join(f"{dtype} {count:,}" for dtype, count in by_dtype.items())
    rows = [
        ("model type", config.model_type),
        ("layers", config.num_hidden_layers),
        ("hidden size", config.hidden_size),
        ("attention heads", f"{config.num_attention_heads} (kv heads {config.num_key_value_heads})"),
        ("rope scaling", rope_text),
        ("vocab size", f"{config.vocab_size:,}"),
        ("parameters", f"{parameters:,} ({_human(parameters)}; {dtypes}; {n_files} safetensors file(s))"),
    ]
    for label, value in rows:
        print(f"{label + ':':<17}{value}")
    return 0


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack inspect PATH``: a checkpoint's architecture and parameter count."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's architecture and parameter count (reads no weights)",
        description="Read config.json and the safetensors headers of a Hugging Face checkpoint and show "
        "its architecture and parameter count. No weights are loaded.",
    )
    parser.add_argument("path", help="checkpoint directory (or its config.json)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run_inspect)


def _run_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"convert writes a new checkpoint; DST must differ from SRC ({src}).")
    if args.to == "gguf":
        return _run_convert_gguf(args, src, dst)
    for flag, value in (
        ("--type", args.type),
        ("--dynamic-rope-as-plain", args.dynamic_rope_as_plain or None),
    ):
        if value is not None:
            raise CheckpointError(
                f"{flag} applies to GGUF output only; add --to gguf (and a DST ending .gguf)."
            )

    import torch

    from lmstack.core import load_pretrained, save_pretrained

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    logger.info("loading %s (dtype %s)", src, args.dtype or "as stored")
    model = load_pretrained(src, dtype=dtype)
    shard_size = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
    side_files = _SideFiles(src)
    save_pretrained(model, dst, tokenizer=side_files, **shard_size)  # one atomic write, files included
    copied = side_files.copied
    logger.info("copied %s", ", ".join(copied) or "no tokenizer files")
    print(
        f"wrote {dst} ({args.dtype or 'dtype as stored'}; copied {len(copied)} tokenizer/generation file(s))"
    )
    return 0


def _run_convert_gguf(args: argparse.Namespace, src: Path, dst: Path) -> int:
    for flag, value in (("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)):
        if value is not None:
            raise CheckpointError(
                f"{flag} applies to --to hf only; GGUF output takes --type f32|f16|q8_0|q4_0 instead."
            )
    if dst.suffix.lower() != ".gguf":
        raise CheckpointError(
            f"with --to gguf, DST is the GGUF file to write and must end in .gguf, got {dst}."
        )

    from lmstack.core.checkpoint import export_gguf

    gguf_type = args.type or "f32"
    export_gguf(
        src, dst, type=gguf_type, dynamic_rope_as_plain=args.dynamic_rope_as_plain, show_progress=True
    )
    print(f"wrote {dst} (GGUF, {gguf_type})")
    return 0


class _SideFiles:
    """Copies the source's tokenizer and generation files into the checkpoint save_pretrained stages."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.copied: list[str] = []

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        for pattern in _TOKENIZER_FILES:
            for file in sorted(self.src.glob(pattern)):
                if file.is_file():
                    shutil.copy2(file, Path(path) / file.name)
                    self.copied.append(file.name)


def register_convert(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack convert SRC DST [--dtype ...] [--to gguf --type ...]``: rewrite a checkpoint."""
    parser = subparsers.add_parser(
        "convert",
        help="write a checkpoint again (cast dtype, reshard), or as one GGUF file for llama.cpp",
        description="Load a Hugging Face checkpoint with lmstack and save it to DST in the Hugging Face "
        "layout (sharded safetensors with index), optionally cast to another dtype; tokenizer and "
        "generation files are copied along. With --to gguf, write DST as a GGUF file (weights, "
        "hyperparameters, tokenizer and chat template) that llama.cpp loads.",
    )
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (created), or the .gguf file with --to gguf")
    parser.add_argument(
        "--to",
        choices=("hf", "gguf"),
        default="hf",
        help="output format: a Hugging Face checkpoint directory (default) or a GGUF file",
    )
    parser.add_argument(
        "--type",
        choices=("f32", "f16", "q8_0", "q4_0"),
        help="GGUF tensor type (with --to gguf; default f32, lossless for any checkpoint dtype)",
    )
    parser.add_argument(
        "--dynamic-rope-as-plain",
        action="store_true",
        help="with --to gguf: write a dynamic-NTK RoPE model as plain RoPE (exact up to its "
        "max_position_embeddings) instead of refusing it",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast the weights (default: keep as stored)",
    )
    parser.add_argument(
        "--max-shard-size", help="largest safetensors shard, e.g. 2GB (default: save_pretrained's)"
    )
    parser.set_defaults(func=_run_convert)
