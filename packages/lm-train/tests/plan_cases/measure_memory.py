"""Peak tensor memory of real lmstack training steps, for the planner's memory test.

What is measured: the bytes of live torch tensor storages on this process, counted when an operator
creates them (a ``TorchDispatchMode``, so also inside autograd's backward, FSDP2's all-gathers and the
optimizer) and when they are freed (a weak reference on each storage; FSDP2 frees and re-allocates
unsharded weights with ``UntypedStorage.resize_``, which is followed too), plus the parameters,
gradients and optimizer states that exist when a step starts. The peak of that count over a training
step is what ``torch.cuda.max_memory_allocated`` reports on a GPU: tensors only, without the
allocator's rounding and caching, the interpreter or the libraries. Temporaries inside one operator
(a kernel's workspace) are not seen, nor are the fake tensors DTensor's sharding propagation makes
(shapes without memory).

Run as ``torchrun ... measure_memory.py SPEC.json OUT_DIR`` (each rank writes ``rank<N>.json``), or
import it and call :func:`run_case` in the calling process.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorMemory(TorchDispatchMode):
    """Counts the bytes of live tensor storages and keeps their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes counted]
        self.current = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_

    def add(self, tensor: Any) -> None:
        if isinstance(tensor, DTensor):
            tensor = tensor._local_tensor
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        if isinstance(tensor, FakeTensor):  # DTensor's sharding propagation: no memory behind it
            return
        storage = tensor.untyped_storage()
        if storage in self.sizes:
            return
        cell = [storage.nbytes()]
        self.sizes[storage] = cell
        self.current += cell[0]
        weakref.finalize(storage, self._free, cell)
        self.peak = max(self.peak, self.current)

    def _free(self, cell: list[int]) -> None:
        self.current -= cell[0]

    def __enter__(self) -> LiveTensorMemory:
        tracker, original = self, self._resize

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = original(storage, size)
            cell = tracker.sizes.get(storage)
            if cell is not None:
                tracker.current += storage.nbytes() - cell[0]
                cell[0] = storage.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
            else:
                tracker.add(torch.empty(0).set_(storage))
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local operators, which come back here
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is not None:  # shapes only (DTensor's sharding propagation)
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        self.peak = max(self.peak, self.current)
        return out


def run_case(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train ``spec``'s model a few steps with the tracker on every step; return the peaks."""
    from lmstack.core import CausalLM, ModelConfig, Tokenizer
    from lmstack.train import DataConfig, _loop
    from lmstack.train._loop import OptimConfig, RunConfig, train_loop
    from lmstack.train._parallel_config import ParallelConfig

    tokenizer = Tokenizer.from_pretrained(spec["tokenizer"])
    peaks: list[int] = []
    original = _loop._Training.train_step

    def tracked(self: Any, step: int) -> Any:
        tracker = LiveTensorMemory()
        parts = getattr(getattr(self, "mesh_model", None), "parts", None) or [self.model]
        for module in [self.model, *parts]:
            for t in [*module.parameters(), *module.buffers()]:
                tracker.add(t)
                tracker.add(t.grad)
        for per_param in self.optimizer.state.values():
            for value in per_param.values():
                tracker.add(value)
        with tracker:
            record = original(self, step)
        peaks.append(tracker.peak)
        return record

    _loop._Training.train_step = tracked  # type: ignore[method-assign]
    try:
        torch.manual_seed(0)
        config = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, **spec["model"])
        result = train_loop(
            CausalLM(config),
            tokenizer,
            DataConfig(
                paths=[spec["data"]], format="text", train_on="all", max_length=spec["seq_len"],
                on_overflow="truncate",  # documents longer than a bin: one full bin each
            ),
            OptimConfig(lr=1e-3, warmup_steps=1),
            RunConfig(
                output_dir=str(out / spec["name"]), max_steps=spec["steps"], batch_size=spec["batch"],
                grad_accum=spec["accum"], save_every=0, device="cpu", tensorboard=False,
                data_parallel=spec.get("data_parallel", "ddp"), measure_activations=False,
                activation_checkpointing=spec["checkpointing"], precision=spec.get("precision", "float32"),
            ),
            parallel=ParallelConfig(**spec["parallel"]) if "parallel" in spec else None,
        )  # fmt: skip
    finally:
        _loop._Training.train_step = original  # type: ignore[method-assign]
    return {"name": spec["name"], "peaks": peaks, "losses": result.losses}


if __name__ == "__main__":
    specs = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    results = [run_case(spec, out_dir) for spec in specs]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
