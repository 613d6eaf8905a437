"""Reference log-probs for DPO and KTO: precomputed once and cached on disk, or live with adapters off.

**Precomputed** (the default). Before the first step, the model as it starts the run (the reference:
the loaded checkpoint, or for LoRA the base with zero-initialised adapters, which computes the same)
scores every pair (or KTO sample) once in eval mode, under the run's precision, and the table
``[units, 2]`` (``[units, 1]`` for KTO) is written to ``<cache>/reference/<key>.npy``, where
``<cache>`` is ``data.cache_dir`` or else the run directory. The key covers what changes the numbers:
the tokenized data's cache key, ``max_length`` and overflow handling, packed or padded, the reference
model's files (``config.json`` contents; every weight file's name, size and modification time, as the
tokenization cache keys its data files), how the base is quantized (QLoRA), and the precision. A
second run on the same data and model reads the table instead of recomputing it; a resumed run finds
it before loading its checkpoint. Under torchrun every rank scores a share of the bins and the table
is summed over the ranks, so each rank holds all of it (4 or 8 bytes per unit).

**Live, adapters off** (``reference: adapter_off``, LoRA/QLoRA only). Each micro-batch is scored a
second time, without gradient, with every peft adapter disabled: the frozen base is the reference
and no table or second model is kept. It costs one more forward per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmstack.core import atomic_write_file
from lmstack.train.data._errors import TrainConfigError, TrainError

if TYPE_CHECKING:
    from lmstack.train._objectives import AnyPreferenceBatch, SegmentLayout

__all__ = [
    "REFERENCE_CACHE_VERSION",
    "ReferenceLogps",
    "ReferenceMode",
    "adapters_disabled",
    "model_fingerprint",
    "prepare_reference",
]

logger = logging.getLogger(__name__)

REFERENCE_CACHE_VERSION = 1
"""Bumped when the table's layout or how it is computed changes."""

ReferenceMode = Literal["precomputed", "adapter_off"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A digest of a model directory: ``config.json``'s contents and each weight file's name, size, mtime.

    Args:
        path: A Hugging Face model directory.

    Returns:
        A hex digest that changes when the weights are rewritten.

    Raises:
        TrainConfigError: The directory does not exist.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise TrainConfigError(f"model directory {str(directory)!r} does not exist", field="model")
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES):
            stat = file.stat()
            digest.update(json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode("utf-8"))
    return digest.hexdigest()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Runs the body with every peft adapter of ``model`` switched off (the frozen base computes alone).

    Raises:
        TrainConfigError: ``model`` has no peft adapter.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise TrainConfigError(
            "reference: adapter_off needs a LoRA or QLoRA run (adapter: lora or qlora); a full "
            "finetune has no adapter to switch off, so use reference: precomputed"
        )
    # Flip peft's own switch directly: BaseTunerLayer.enable_adapters() would also change which
    # parameters require gradients, which the optimizer's parameter list must not see.
    previous = [bool(layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer._disable_adapters = was


class ReferenceLogps:
    """The reference model's summed completion log-probs for the batches of a run.

    Args:
        table: ``[units, k]`` precomputed log-probs indexed by unit (``k`` = 2 for pairs, 1 for KTO)
            on the training device, or None for the live mode.
        live_model: The model whose adapters are switched off to score live (adapter_off mode).
        chunk_size: Log-softmax chunk rows of the live forward.
    """

    def __init__(
        self, table: Tensor | None, *, live_model: nn.Module | None = None, chunk_size: int | None = None
    ) -> None:
        if (table is None) == (live_model is None):
            raise TrainError("ReferenceLogps needs a precomputed table or a live model, not both")
        self.table = table
        self.live_model = live_model
        self.chunk_size = chunk_size

    def _live(self, batch: AnyPreferenceBatch, layout: SegmentLayout) -> Tensor:
        from lmstack.train._objectives import sequence_logps

        assert self.live_model is not None
        with torch.no_grad(), adapters_disabled(self.live_model):
            logps, _ = sequence_logps(self.live_model, batch, layout, chunk_size=self.chunk_size)
        return logps

    def pairs(
        self, batch: AnyPreferenceBatch, layout: SegmentLayout, module: nn.Module
    ) -> tuple[Tensor, Tensor]:
        """``(chosen [P], rejected [P])`` reference log-probs of a batch's pairs."""
        assert layout.second is not None
        if self.table is not None:
            rows = self.table[layout.unit_index]
            return rows[:, 0], rows[:, 1]
        logps = self._live(batch, layout)
        return logps[layout.first], logps[layout.second]

    def samples(self, batch: AnyPreferenceBatch, layout: SegmentLayout, module: nn.Module) -> Tensor:
        """``[N]`` reference log-probs of a KTO batch's samples."""
        if self.table is not None:
            return self.table[layout.unit_index, 0]
        return self._live(batch, layout)[layout.first]


def _cache_key(dataset: Any, *, paired: bool, model_tag: str, precision: str) -> str:
    payload = {
        "version": REFERENCE_CACHE_VERSION,
        "data": dataset.data.key,
        "max_length": dataset.max_length,
        "overflow": getattr(dataset, "on_overflow", None),
        "units": int(dataset.num_units),
        "packed": type(dataset).__name__,
        "paired": paired,
        "model": model_tag,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:40]


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _reshard(model: nn.Module) -> None:
    """Frees the whole parameters an FSDP2 forward left gathered.

    FSDP2 keeps the root module's parameters unsharded after a forward, for the backward that usually
    follows; after a forward without backward (the reference pass) the next training step would then
    compute with them while its gradients miss the sharded parameters (measured: a gradient norm of
    3.55 instead of 8.77 and a different loss from the second update on).
    """
    if not dist.is_initialized():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def _compute_table(
    model: nn.Module,
    dataset: Any,
    *,
    paired: bool,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int,
    world_size: int,
    chunk_size: int | None,
    duplicates: int = 1,
) -> np.ndarray:
    from lmstack.train._objectives import segment_layout, sequence_logps

    columns = 2 if paired else 1
    total = len(dataset.data)
    values = torch.zeros(total, columns, dtype=torch.float64, device=device)
    filled = torch.zeros(total, dtype=torch.float64, device=device)
    chunks = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    # Every rank runs the same number of forwards (FSDP gathers its shards collectively); a rank
    # without a chunk of its own in the last round scores chunk 0 again and discards it.
    rounds = -(-len(chunks) // world_size)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(
            total=rounds,
            desc="Reference log-probs",
            unit="batch",
            disable=(dist.is_initialized() and dist.get_rank() != 0) or None,
        )
        for r in range(rounds):
            index = r * world_size + rank
            mine = index < len(chunks)
            batch = dataset.collate([dataset[i] for i in chunks[index if mine else 0]]).to(device)
            layout = segment_layout(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logps, _ = sequence_logps(model, batch, layout, chunk_size=chunk_size)
            if mine:
                units = layout.unit_index
                values[units, 0] = logps[layout.first].double()
                if paired:
                    assert layout.second is not None
                    values[units, 1] = logps[layout.second].double()
                filled[units] += 1
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
        _reshard(model)
    if dist.is_initialized():
        dist.all_reduce(values)
        dist.all_reduce(filled)
        if duplicates > 1:  # ranks of one data-parallel coordinate scored the same bins
            values /= duplicates
            filled /= duplicates
    kept = np.asarray(dataset._plan.unit, dtype=np.int64)
    counts = filled.cpu().numpy()
    if not (counts[kept] == 1).all() or counts.sum() != kept.shape[0]:
        raise TrainError(
            f"the reference pass scored {int((counts[kept] >= 1).sum())} of {kept.shape[0]} units "
            "(each must be scored exactly once); this is a bug, please report it"
        )
    table = values.cpu().numpy().astype(np.float32)
    table[counts == 0] = np.nan  # units left out by overflow handling never reach a batch
    return table


def prepare_reference(
    model: nn.Module,
    dataset: Any,
    *,
    paired: bool,
    mode: ReferenceMode,
    model_tag: str,
    cache_root: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int,
    world_size: int,
    chunk_size: int | None = None,
    duplicates: int = 1,
) -> ReferenceLogps:
    """The reference log-probs of a run: read from the cache, computed (and cached), or live.

    Call it before the run loads a checkpoint: ``model`` must still be the reference.

    Args:
        model: The model as the run starts (unwrapped; under FSDP the sharded model itself).
        dataset: The run's preference dataset (packed or padded).
        paired: Pairs (two columns) or KTO samples (one).
        mode: ``precomputed`` or ``adapter_off``.
        model_tag: What identifies the reference weights (:func:`model_fingerprint` plus anything
            that changes them, such as QLoRA's quantization).
        cache_root: Where ``reference/<key>.npy`` goes.
        batch_size: Bins (or padded units) per forward of the reference pass.
        device: The training device.
        precision: ``float32`` or ``bfloat16`` (the reference is scored as the policy is).
        rank: Which share of the bins this process scores (its data-parallel rank).
        world_size: How many shares there are (the data-parallel size).
        chunk_size: Log-softmax chunk rows.
        duplicates: Processes that score each share together (tensor, sequence parallel ranks): the
            table, summed over every process, is divided by it.

    Returns:
        The :class:`ReferenceLogps` the objective reads.
    """
    if mode == "adapter_off":
        with adapters_disabled(model):  # fails early, naming the fix, when there is no adapter
            pass
        logger.info("reference log-probs: computed live with the adapters disabled (one more forward a step)")
        return ReferenceLogps(None, live_model=model, chunk_size=chunk_size)
    key = _cache_key(dataset, paired=paired, model_tag=model_tag, precision=precision)
    path = cache_root / "reference" / f"{key}.npy"
    if _all_ranks_agree(path.is_file(), device):
        table = np.load(path)
        logger.info("reference log-probs: read %d units from %s", table.shape[0], path)
    else:
        table = _compute_table(
            model,
            dataset,
            paired=paired,
            batch_size=batch_size,
            device=device,
            precision=precision,
            rank=rank,
            world_size=world_size,
            chunk_size=chunk_size,
            duplicates=duplicates,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, table)
            atomic_write_file(path, buffer.getvalue())
            logger.info("reference log-probs: computed %d units, cached in %s", table.shape[0], path)
        if dist.is_initialized():
            dist.barrier()
    return ReferenceLogps(torch.from_numpy(table).to(device), chunk_size=chunk_size)
