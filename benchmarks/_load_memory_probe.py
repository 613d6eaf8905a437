"""Run in a fresh process: load or save a checkpoint one way and print peak resident memory as JSON.

Usage:
    python _load_memory_probe.py load {lmstack|safetensors|transformers} CHECKPOINT_DIR
    python _load_memory_probe.py save {lmstack|safetensors} CHECKPOINT_DIR OUT_DIR

``lmstack`` is ``load_pretrained`` / ``save_pretrained``; ``safetensors`` is the bare ``safetensors``
library doing the same job (``safe_open`` into a meta-built model / ``save_file`` per shard), the floor
lmstack's checks, layouts and atomic writes add to; ``transformers`` is
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_peak() -> None:
    # Linux: writing 5 resets the resident high-water mark, so the peak is this step's alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _unique_params(model: Any) -> list[Any]:
    return list({id(p): p for p in model.parameters()}.values())


def _library_load(path: str) -> Any:
    """load_pretrained's job (meta model, tensor by tensor into place) with the safetensors reader."""
    import torch
    from safetensors import safe_open

    from lmstack.core import CausalLM, load_config
    from lmstack.core.checkpoint import checkpoint_files

    config = load_config(path)
    model = CausalLM(config, device="meta", dtype=torch.float32)
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                module_name, _, attr = key.rpartition(".")
                value = f.get_tensor(key).to(torch.float32)
                setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value))
    model.tie_weights()
    return model


def _load(library: str, path: str) -> dict[str, Any]:
    import torch

    if library == "lmstack":
        from lmstack.core import load_pretrained

        def load() -> Any:
            return load_pretrained(path, dtype=torch.float32)
    elif library == "safetensors":

        def load() -> Any:
            return _library_load(path)
    else:
        import transformers

        def load() -> Any:
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # Everything imported and initialised before the baseline, so the delta is the loading alone.
    _reset_peak()
    baseline = _rss_bytes()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    params = _unique_params(model)
    weights = sum(p.numel() * p.element_size() for p in params)
    # A loader may leave weights memory-mapped and not yet read; reading every parameter once (as a
    # first forward would) makes them resident, so the loaders are compared on usable models.
    with torch.no_grad():
        # One element per 4 KiB page: touches every page without allocating a temporary copy.
        checksum = float(sum(p.reshape(-1)[:: 4096 // p.element_size()].sum() for p in params))
    touched = _peak_bytes()
    return {"baseline": baseline, "peak_load": peak, "peak_touched": touched, "weights": weights,
            "seconds": seconds, "checksum": checksum}  # fmt: skip


def _library_save(model: Any, out: str, shard_bytes: int) -> None:
    """save_pretrained's weight files, shard by shard, with the bare safetensors writer."""
    from safetensors.torch import save_file

    Path(out).mkdir(parents=True)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in model.state_dict().items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    for i, tensors in enumerate(shards):
        file = Path(out, f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file(tensors, file, metadata={"format": "pt"})
        with open(file, "rb") as fh:  # as save_pretrained: on disk before it returns
            os.fsync(fh.fileno())


def _save(library: str, path: str, out: str) -> dict[str, Any]:
    import torch

    from lmstack.core import load_pretrained, save_pretrained

    model = load_pretrained(path, dtype=torch.float32)
    params = _unique_params(model)
    with torch.no_grad():  # resident before the baseline: the step's own memory is what is measured
        float(sum(p.reshape(-1)[:: 4096 // p.element_size()].sum() for p in params))
    weights = sum(p.numel() * p.element_size() for p in params)
    _reset_peak()
    baseline = _rss_bytes()
    start = time.perf_counter()
    if library == "lmstack":
        save_pretrained(model, out, max_shard_size="100MB")
    else:
        _library_save(model, out, 100 * 10**6)
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    files = sorted(Path(out).glob("*.safetensors"))
    return {"baseline": baseline, "peak_load": peak, "peak_touched": peak, "weights": weights,
            "seconds": seconds, "bytes": sum(f.stat().st_size for f in files)}  # fmt: skip


def main() -> None:
    action, library, path = sys.argv[1:4]
    result = _load(library, path) if action == "load" else _save(library, path, sys.argv[4])
    print(json.dumps({"action": action, "library": library, **result}))


if __name__ == "__main__":
    main()
