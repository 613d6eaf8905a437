"""The training loop every recipe shares, and the configs it reads.

One optimizer step = ``grad_accum`` micro-batches of packed bins. The loss of a step is the summed
token cross-entropy divided by the number of loss tokens in the *whole* step, so 8 micro-batches of 1
bin give exactly the gradient of 1 micro-batch of 8 bins. A checkpoint every ``save_every`` steps
holds weights, optimizer, scheduler, random states and the data position; a restarted run resumes
from the newest one without replaying any batch. A non-finite loss or gradient stops the run before
the optimizer touches the weights, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmstack.core import CausalLM, Tokenizer, save_pretrained
from lmstack.train._config import DataConfig, save_config
from lmstack.train._dist import all_reduce_sum, barrier, init_distributed
from lmstack.train._errors import TrainError
from lmstack.train._schedule import lr_factor
from lmstack.train._state import latest_checkpoint, load_checkpoint, save_checkpoint
from lmstack.train.data import IGNORE_INDEX, PackedBatch, ResumableLoader, build_dataset

__all__ = ["OptimConfig", "RunConfig", "TrainResult", "token_loss", "train_loop"]

logger = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay of matrices (norms, biases and embeddings get none).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup steps.
        decay: ``cosine``, ``linear`` or ``constant`` after warmup.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        grad_clip: Clip the global gradient norm to this (0: no clipping).
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    """How long to train, how to batch, where to write.

    Attributes:
        output_dir: The run directory (metrics.jsonl, checkpoints/, final/).
        max_steps: Optimizer steps of the whole run.
        batch_size: Bins (or padded samples) per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        seed: Seed of initialisation and data order.
        save_every: Steps between checkpoints (0: only at the end).
        keep_last: Checkpoints to keep.
        resume: ``auto`` continues from the newest checkpoint in ``output_dir``; ``never`` refuses
            to start when one exists.
        log_every: Steps between progress-bar updates (metrics.jsonl gets every step).
        precision: ``float32``, or ``bfloat16`` autocast where the device supports it.
        activation_checkpointing: Recompute activations in backward to save memory.
        device: ``cpu``, ``cuda`` or ``auto`` (under torchrun: this rank's ``cuda:LOCAL_RANK``).
    """

    output_dir: str = "runs/default"
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"
    log_every: int = 10
    precision: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    final_loss: float
    tokens: int
    seconds: float
    model_dir: Path
    losses: list[float]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of next-token prediction over the labelled tokens (labels unshifted).

    ``labels[t]`` is the target of the logits at ``t - 1``; ``-100`` carries no loss (every packed
    sample starts with one, so no sample is predicted from another).
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _batches(loader: ResumableLoader[Any]) -> Iterator[Any]:
    while True:  # epochs follow each other; the loader advances its own position
        yield from loader


def train_loop(
    model: CausalLM,
    tokenizer: Tokenizer,
    data: DataConfig,
    optim: OptimConfig,
    run: RunConfig,
    *,
    config_to_save: Any = None,
    save_model: Callable[[CausalLM, Path], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data``; resume from ``run.output_dir`` when a checkpoint is there.

    Args:
        model: The model to train (its trainable parameters are those with ``requires_grad``).
        tokenizer: Its tokenizer (tokenizes the data, saved with the final model).
        data: The data config.
        optim: Optimizer and schedule.
        run: Steps, batching, checkpoints.
        config_to_save: The full recipe config, written to ``config.yaml`` in the run directory.
        save_model: How to write the final model (default: a Hugging Face directory with the
            tokenizer, via lmstack-core's ``save_pretrained``).

    Returns:
        Steps, final loss, tokens and time; the final model directory.

    Raises:
        TrainError: on a non-finite loss or gradient (the last checkpoint stays intact), or when
            ``resume='never'`` and the run directory already holds checkpoints.
    """
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = init_distributed(run.device)
    device = info.device
    if config_to_save is not None and info.is_main:
        save_config(config_to_save, out / "config.yaml")
    torch.manual_seed(run.seed)
    model.to(device).train()
    if run.activation_checkpointing:
        model.enable_activation_checkpointing()
    # Under torchrun each rank holds a replica; DDP averages gradients during backward.
    ddp = None
    if info.world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net: torch.nn.Module = ddp if ddp is not None else model
    dataset = build_dataset(data, tokenizer)
    loader: ResumableLoader[Any] = ResumableLoader(
        dataset, run.batch_size, seed=run.seed, rank=info.rank, world_size=info.world_size
    )
    optimizer = torch.optim.AdamW(
        _param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s,
            total_steps=run.max_steps,
            warmup_steps=optim.warmup_steps,
            decay=optim.decay,
            min_ratio=optim.min_lr_ratio,
        ),
    )
    start_step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        if run.resume == "never":
            raise TrainError(
                f"{out} already holds checkpoint {ckpt.name}; use resume=auto or a new output_dir."
            )
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        loader.load_state_dict(state["data"])
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        logger.info("resumed from %s (step %d)", ckpt, start_step)
    autocast = run.precision == "bfloat16"
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = (out / "metrics.jsonl").open("a", encoding="utf-8") if info.is_main else None
    batches = _batches(loader)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(
        total=run.max_steps,
        initial=start_step,
        desc="Training",
        unit="step",
        disable=not info.is_main or None,
    )
    loss_value = float("nan")
    try:
        for step in range(start_step, run.max_steps):
            t0 = time.perf_counter()
            window: list[PackedBatch] = [next(batches) for _ in range(run.grad_accum)]
            # Normalise by the loss tokens of the whole step on every rank; DDP's gradient average
            # divides by the world size, which the factor undoes.
            loss_tokens = all_reduce_sum(sum(b.num_loss_tokens for b in window), device)
            if loss_tokens == 0:
                raise TrainError(
                    f"step {step + 1} has no token to learn from; check data.train_on and the data."
                )
            total = torch.zeros((), device=device)
            for i, micro in enumerate(window):
                b = micro.to(device)
                last_micro = i == len(window) - 1
                sync = ddp.no_sync() if ddp is not None and not last_micro else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        logits = net(b.input_ids, b.position_ids, b.attention())
                    loss = token_loss(logits, b.labels) * (info.world_size / loss_tokens)
                    loss.backward()
                total += loss.detach()
            loss_value = all_reduce_sum(float(total), device) / info.world_size
            clip = optim.grad_clip if optim.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
                last = latest_checkpoint(out)
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                raise TrainError(
                    f"non-finite {what} at step {step + 1}; "
                    f"the weights were not updated. Last good checkpoint: {last or 'none'}. "
                    "Lower optim.lr, raise warmup, or check the data."
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = int(all_reduce_sum(sum(b.num_tokens for b in window), device))
            tokens_seen += step_tokens
            slots = all_reduce_sum(sum(b.input_ids.numel() for b in window), device)
            record = {
                "step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                "tokens_per_s": step_tokens / max(time.perf_counter() - t0, 1e-9),
                "padding_ratio": 1 - step_tokens / max(slots, 1),
            }  # fmt: skip
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            losses.append(loss_value)
            bar.update(1)
            if (step + 1) % max(run.log_every, 1) == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if run.save_every and (step + 1) % run.save_every == 0 and step + 1 < run.max_steps:
                if info.is_main:  # replicas are identical: one rank writes
                    save_checkpoint(
                        out,
                        step + 1,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        trainer_state={"data": loader.state_dict(), "tokens": tokens_seen},
                        keep_last=run.keep_last,
                    )
                barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    final = out / "final"
    model.eval()
    if info.is_main:
        if save_model is not None:
            save_model(model, final)
        else:
            save_pretrained(model, final, tokenizer=tokenizer)
    barrier()
    seconds = time.perf_counter() - started
    logger.info(
        "finished %d steps in %.1f s; final loss %.4f; model in %s", run.max_steps, seconds, loss_value, final
    )
    return TrainResult(run.max_steps, loss_value, tokens_seen, seconds, final, losses)
