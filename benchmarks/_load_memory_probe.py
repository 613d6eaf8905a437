"""Run in a fresh process: load a checkpoint with one loader and print peak resident memory as JSON.

Usage: python _load_memory_probe.py {lmstack|transformers} CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    loader, path = sys.argv[1], sys.argv[2]
    import torch

    if loader == "lmstack":
        from lmstack.core import load_pretrained

        def load() -> torch.nn.Module:
            return load_pretrained(path, dtype=torch.float32)
    else:
        import transformers

        def load() -> torch.nn.Module:
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # Everything imported and initialised before the baseline, so the delta is the loading alone.
    baseline = _rss_bytes()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    params = list({id(p): p for p in model.parameters()}.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    # A loader may leave weights memory-mapped and not yet read; reading every parameter once (as a
    # first forward would) makes them resident, so both loaders are compared on usable models.
    with torch.no_grad():
        # One element per 4 KiB page: touches every page without allocating a temporary copy.
        checksum = float(sum(p.reshape(-1)[:: 4096 // p.element_size()].sum() for p in params))
    touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loader": loader, "baseline": baseline, "peak_load": peak, "peak_touched": touched,
                      "weights": weights, "seconds": seconds, "checksum": checksum}))  # fmt: skip


if __name__ == "__main__":
    main()
