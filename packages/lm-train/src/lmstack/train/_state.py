"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``<run>/checkpoints/step-00000042/`` holding the trainable weights, the
optimizer and scheduler states, every random generator's state, and ``trainer_state.json`` (step,
data position, counters). It is written with lmstack-core's :func:`~lmstack.core.atomic_directory`
(a hidden sibling, flushed, then swapped into place), so a run killed at any moment of a save leaves
every earlier checkpoint complete and no half-written one that looks complete; only the newest
``keep_last`` checkpoints are kept, and a pruned one is renamed out of sight before it is deleted.

The files never depend on how the run was spread over processes: weights are whole tensors keyed by
parameter name, and the optimizer state is in ``torch.optim.Optimizer.state_dict()``'s own layout
(parameters numbered in parameter-group order). An FSDP2 run gathers its shards into that layout
before rank 0 writes (:func:`gather_train_state`) and shards it again on load, so a checkpoint's
weights and optimizer state load under one process, DDP or FSDP2 at any world size (the data
position in ``trainer_state.json`` is the loader's business: it needs the same batch layout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lmstack.core import CausalLM, atomic_directory
from lmstack.train.data._errors import TrainError

__all__ = [
    "DCP_DIR",
    "gather_train_state",
    "is_distributed_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_distributed_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "set_rng_state",
    "unsharded_model",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
DCP_DIR = "dcp"
"""Where a distributed checkpoint keeps its torch.distributed.checkpoint files (weights and optimizer)."""


def rng_state() -> dict[str, Any]:
    """The states of Python's, torch's CPU and (when present) CUDA random generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them for full finetuning, adapters for LoRA)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors, gathered to rank 0's CPU memory (the other ranks get empty dicts).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _indexed_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) -> by position."""
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
    }


def _named_optimizer_state(
    indexed: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> dict[str, Any]:
    """The inverse of :func:`_indexed_optimizer_state` for this model's and optimizer's parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = sum(len(g["params"]) for g in indexed["param_groups"])
    if saved != len(order) or len(indexed["param_groups"]) != len(optimizer.param_groups):
        raise TrainError(
            f"checkpoint {path} holds optimizer state for {saved} parameters in "
            f"{len(indexed['param_groups'])} groups, but this run optimizes {len(order)} in "
            f"{len(optimizer.param_groups)}; resume with the configuration that wrote it."
        )
    return {
        "state": {order[int(i)]: value for i, value in indexed["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in indexed["param_groups"]
        ],
    }


def gather_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimizer state, as :func:`save_checkpoint` writes them.

    Args:
        model: The model (FSDP2-sharded when ``sharded``).
        optimizer: Its optimizer.
        sharded: Gather FSDP2 shards into whole tensors on rank 0's CPU. This is a collective:
            every rank must call it; ranks other than 0 get empty dicts.

    Returns:
        ``(weights, optimizer_state)``.
    """
    if not sharded:
        return trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = get_model_state_dict(model, options=_full_options())
    named = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not full:  # not rank 0
        return {}, {}
    wanted = trainable_state(model)  # names only: a tied head appears once, as in the unsharded layout
    return {name: cast(torch.Tensor, full[name]) for name in wanted}, _indexed_optimizer_state(named)


def unsharded_model(model: CausalLM, *, sharded: bool) -> CausalLM | None:
    """The model with whole weights, to save as a Hugging Face directory.

    Args:
        model: The trained model.
        sharded: It is FSDP2-sharded: gather its weights (a collective: every rank must call this)
            into a new plain model on rank 0's CPU.

    Returns:
        ``model`` itself when not sharded; else the gathered copy on rank 0 and None elsewhere.
    """
    if not sharded:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())
    if not full:
        return None
    plain = CausalLM(model.config, device="meta")
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    return plain.eval()


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step`` and prune older ones beyond ``keep_last``.

    ``model_state`` and ``optimizer_state`` (from :func:`gather_train_state`) replace reading
    ``model`` and ``optimizer``, which is how a sharded run writes whole tensors.
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    with atomic_directory(target) as tmp:
        torch.save(trainable_state(model) if model_state is None else model_state, tmp / "model.pt")
        torch.save(
            optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt"
        )
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        # The JSON goes last: a directory with it is complete (one copied in by hand too).
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
    _prune(root, keep_last)
    logger.info("saved checkpoint %s", target)
    return target


def _prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints (and what an interrupted prune left).

    Each is first renamed to a hidden name in one step, so a prune killed midway never leaves a
    partly deleted directory that still looks like a complete checkpoint.
    """
    for leftover in root.glob(".step-*.pruned"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in _checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        hidden = root / f".{old.name}.pruned"
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def _checkpoints(root: Path) -> list[Path]:
    found = (
        [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = _checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random generators; return the trainer state.

    Args:
        path: The checkpoint directory.
        model: The model to load into.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        sharded: The model is FSDP2-sharded: every rank reads the whole tensors and keeps its shard
            (a collective: every rank must call this).
    """
    path = Path(path)
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise RuntimeError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written by another configuration?"
        )
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # A tied head is saved once; give every name that refers to the parameter its value.
        canonical = {id(p): name for name, p in model.named_parameters()}
        full = {name: weights[canonical[id(p)]]
                for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # fmt: skip
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, full, options=options)
        named = _named_optimizer_state(optim_state, model, optimizer, path)
        with _own_implementation(optimizer):
            set_optimizer_state_dict(model, optimizer, named, options=options)
    else:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
        with _own_implementation(optimizer):
            optimizer.load_state_dict(optim_state)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / STATE_FILE).read_text())


# -- distributed checkpoints (torch.distributed.checkpoint) ------------------------------------------


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint holds its weights and optimizer as a torch.distributed.checkpoint."""
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _dcp_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Keyed by parameter name throughout (``state.<name>.exp_avg``...), so the files do not depend on how
    # parameters were grouped, sharded or split into pipeline stages.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """The sharded (DTensor) weights and optimizer states of this rank's model parts, by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state: dict[str, Any] = {}
    for part, optimizer in zip(parts, optimizers, strict=True):
        model_sd, optim_sd = get_state_dict(part, optimizer, options=_dcp_options())
        trainable = set(trainable_state(part))
        state.update({f"model.{k}": v for k, v in model_sd.items() if k in trainable})
        state.update({f"optim.{k}": v for k, v in optim_sd.items()})
    return state


def save_distributed_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path | None:
    """Write the checkpoint of ``step`` with torch.distributed.checkpoint (a collective: every rank calls it).

    Every rank writes its own shards (no gather to one rank), in parallel, into one staging directory that
    rank 0 swaps into place atomically once all have finished, so a run killed mid-save leaves no
    checkpoint that looks complete. Tensors are keyed by parameter name with their global shapes, so the
    checkpoint loads under any other layout (tensor, sequence, pipeline or data parallel, or one process).

    Args:
        run_dir: The run directory (``checkpoints/step-NNNNNNNN`` is written under it).
        step: The step the checkpoint holds.
        parts: This rank's model parts (one, or a pipeline rank's stages), with the whole model's
            parameter names.
        optimizers: One optimizer per part.
        scheduler: The learning-rate scheduler (rank 0's is saved; all ranks step alike).
        trainer_state: Step counters and the data position (rank 0's is saved).
        keep_last: Checkpoints to keep.

    Returns:
        The checkpoint directory on rank 0, None elsewhere.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    state = _dcp_state(parts, optimizers)
    main = not dist.is_initialized() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        staging: list[Any] = [str(stack.enter_context(atomic_directory(target))) if main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(staging, src=0)
        tmp = Path(staging[0])
        dcp.save(state, checkpoint_id=tmp / DCP_DIR)
        if main:
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
            (tmp / STATE_FILE).write_text(
                json.dumps({"step": step, "format": "dcp", **trainer_state}, indent=2) + "\n"
            )
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are written before rank 0 swaps the directory in
    if not main:
        return None
    _prune(root, keep_last)
    logger.info("saved distributed checkpoint %s", target)
    return target


def load_distributed_checkpoint(
    path: str | os.PathLike[str],
    *,
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    scheduler: Any,
) -> dict[str, Any]:
    """Restore what :func:`save_distributed_checkpoint` wrote, resharded to this run's layout.

    A collective under torchrun (every rank reads the pieces of the tensors it holds); also works in
    one process without a process group. Returns the trainer state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = _dcp_state(parts, optimizers)
    try:
        dcp.load(state, checkpoint_id=path / DCP_DIR)
    except Exception as exc:  # missing keys and shape mismatches surface here
        raise TrainError(
            f"cannot load distributed checkpoint {path}: {type(exc).__name__}: {str(exc)[:500]}; was it "
            "written for another model or adapter configuration?"
        ) from exc
    for part, optimizer in zip(parts, optimizers, strict=True):
        names = set(trainable_state(part))
        model_sd = {k: state[f"model.{k}"] for k in names}
        optim_sd = {k[len("optim.") :]: v for k, v in state.items() if k.startswith("optim.")}
        with _own_implementation(optimizer):
            set_state_dict(
                part,
                optimizer,
                model_state_dict=model_sd,
                optim_state_dict=_own_optimizer_keys(optim_sd, names),
                options=_dcp_state_options(),
            )
    extra = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return cast(dict[str, Any], json.loads((path / STATE_FILE).read_text()))


@contextlib.contextmanager
def _own_implementation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep this run's AdamW implementation (``fused``, ``foreach``) across loading a saved state.

    Loading an optimizer's state replaces its parameter groups with the saved ones, flags included, but
    which kernel steps the parameters is this run's choice: a fused one-process run's checkpoint resumes
    under FSDP (whose DTensor shards take the default implementation), and the other way round.
    """
    flags = [{k: group.get(k) for k in ("fused", "foreach")} for group in optimizer.param_groups]
    yield
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)


def _own_optimizer_keys(flat: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The flattened optimizer entries (``state.<name>.<key>``, ``param_groups.<name>.<key>``) of names."""
    own: dict[str, Any] = {}
    for key, value in flat.items():
        kind, _, rest = key.partition(".")
        # The last dotted part is the state's or group's own key (exp_avg, lr...): no dots in those.
        if kind in ("state", "param_groups") and rest.rpartition(".")[0] in names:
            own[key] = value
    return own


def _dcp_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
