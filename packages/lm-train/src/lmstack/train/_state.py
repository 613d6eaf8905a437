"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``<run>/checkpoints/step-00000042/`` holding the trainable weights, the
optimizer and scheduler states, every random generator's state, and ``trainer_state.json`` (step,
data position, counters). It is written into a temporary sibling and renamed into place, so a run
killed mid-save leaves the previous checkpoint intact and no half-written one that looks complete;
only the newest ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


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


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Atomically write the checkpoint of ``step`` and prune older ones beyond ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        torch.save(trainable_state(model), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        # The JSON goes last: a directory with it is complete.
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", target)
    return target


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
    path: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random generators; return the trainer state."""
    path = Path(path)
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise RuntimeError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written by another configuration?"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / STATE_FILE).read_text())
