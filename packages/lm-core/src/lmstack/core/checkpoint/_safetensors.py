"""A streaming reader and writer of the safetensors format.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to dtype,
shape and byte offsets, then the raw bytes. Reading tensor by tensor straight into freshly allocated
tensors (no mmap, no intermediate buffer) and writing straight from tensor memory keeps peak memory
at the weights themselves plus one tensor, which is what lets loading stay near 1x the model size.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmstack.core._errors import CheckpointError

__all__ = ["TensorInfo", "iter_safetensors", "read_safetensors_header", "read_tensor", "write_safetensors"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading any tensor data.

    Returns:
        ``(tensors, metadata)``: tensor locations by name, and the file's string metadata.

    Raises:
        CheckpointError: if the file is missing, truncated or not a valid safetensors file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{p} is not a safetensors file (only {len(head)} bytes); re-download or re-save it."
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{p} is corrupt: its header claims {n} bytes but the file has {size}; "
                    "re-download or re-save it."
                )
            header_bytes = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc}") from exc
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{p} is corrupt: its header is not valid JSON ({exc}); re-download or re-save it."
        ) from exc
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    data_size = size - base
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{p} is corrupt: bad header entry for tensor {name!r} ({exc!r}).") from exc
        info = TensorInfo(name, dtype, shape, base + begin, base + end)
        expected = info.numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise CheckpointError(
                f"{p} is corrupt or truncated: tensor {name!r} ({entry['dtype']}, shape {list(shape)}) "
                f"claims bytes {begin}..{end} but needs {expected} bytes (data section: {data_size}); "
                "re-download or re-save it."
            )
        tensors[name] = info
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _as_bytes(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy, and no numpy needed).

    The view does not keep the tensor alive: callers hold ``t`` while they use it.
    """
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("expected a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def read_tensor(f: io.BufferedReader, info: TensorInfo, path: str | os.PathLike[str] = "?") -> Tensor:
    """Read one tensor from an open file into a new CPU tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    view = _as_bytes(out)
    f.seek(info.start)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(
                f"{path} is truncated: tensor {info.name!r} ended after {got} of {len(view)} bytes."
            )
        got += n
    return out


def iter_safetensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` pairs from a file, one tensor in memory at a time (besides the caller's)."""
    tensors, _ = read_safetensors_header(path)
    wanted = list(tensors) if names is None else list(names)
    with open(path, "rb") as f:
        for name in sorted(wanted, key=lambda k: tensors[k].start):
            yield name, read_tensor(f, tensors[name], path)


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> int:
    """Write tensors to ``path`` in safetensors format, streaming from their memory.

    CPU tensors that are already contiguous are written without a copy; others are copied one at
    a time. Returns the number of data bytes written.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise CheckpointError(
                f"cannot save tensor {name!r}: dtype {t.dtype} has no safetensors encoding."
            )
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach()
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.to("cpu").contiguous()
            f.write(_as_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return offset
