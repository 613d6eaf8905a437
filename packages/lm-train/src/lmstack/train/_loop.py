"""The training loop every recipe shares, and the configs it reads.

One optimizer step = ``grad_accum`` micro-batches of packed bins. The loss of a step is the summed
token cross-entropy divided by the number of loss tokens in the *whole* step, so 8 micro-batches of 1
bin give exactly the gradient of 1 micro-batch of 8 bins. A checkpoint every ``save_every`` steps
holds weights, optimizer, scheduler, random states and the data position; a restarted run resumes
from the newest one without replaying any batch. A non-finite loss or gradient stops the run before
the optimizer touches the weights, so the last checkpoint stays the last good one.

Under ``torchrun`` the model is replicated (DDP) or sharded (FSDP2) over the ranks
(``run.data_parallel``); either way each rank's loss is scaled by ``world_size / step loss tokens`` and
the gradient average undoes the world size, so N processes equal one process with N times the batch.
Every step goes to ``metrics.jsonl`` and, when TensorBoard is installed, to ``tensorboard/``; the run
ends with a :class:`TrainResult` whose :meth:`~TrainResult.summary` is what ``lmstack train`` prints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lmstack.core import CausalLM, Tokenizer, save_pretrained
from lmstack.train._activations import ActivationMemory, measure_activation_memory
from lmstack.train._compile import CompileWatch, compile_decoder_layers
from lmstack.train._config import save_config
from lmstack.train._dist import (
    DataParallel,
    all_reduce_max,
    all_reduce_sums,
    all_reduce_tensor_sum,
    barrier,
    init_distributed,
    scalar_value,
    wrap_data_parallel,
)
from lmstack.train._monitor import SCALARS, ScalarWriter, open_tensorboard, peak_memory, use_tensorboard
from lmstack.train._objectives import LanguageModeling, Objective, loss_targets
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train._reference import prepare_reference
from lmstack.train._schedule import lr_factor
from lmstack.train._state import (
    gather_train_state,
    is_distributed_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_distributed_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
    unsharded_model,
)
from lmstack.train.data import DataConfig, ResumableLoader
from lmstack.train.data._errors import TrainError

__all__ = ["OptimConfig", "RunConfig", "TrainResult", "loss_targets", "train_loop"]

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
        seed: Seed of the model's initialisation (and of the random generators the run starts
            with); the data order is ``data.shuffle_seed``'s.
        save_every: Steps between checkpoints (0: only at the end).
        keep_last: Checkpoints to keep.
        resume: ``auto`` continues from the newest checkpoint in ``output_dir``; ``never`` refuses
            to start when one exists.
        log_every: Steps between progress-bar updates (metrics.jsonl gets every step).
        precision: ``float32``; ``bfloat16``: autocast over fp32 weights where the device supports it
            (each projection casts its weight to bf16 on use, and the casts are kept for backward);
            ``bfloat16-mp``: FSDP2's mixed precision, as torchtitan trains: the weights are gathered
            and computed with in bf16 (half the all-gather bytes and no per-use casts), gradients
            are reduced in fp32 into the fp32 shards that AdamW steps. ``bfloat16-mp`` needs FSDP2:
            ``run.data_parallel: fsdp`` under torchrun, or a ``parallel:`` layout that shards.
        activation_checkpointing: Recompute activations in backward to save memory.
        device: ``cpu``, ``cuda`` or ``auto`` (under torchrun: this rank's ``cuda:LOCAL_RANK``).
        data_parallel: How ``torchrun`` ranks share the model (no effect in one process). ``ddp``
            keeps a whole replica of weights and optimizer state on every rank and all-reduces
            gradients. ``fsdp`` shards weights, gradients and optimizer state over the ranks with
            FSDP2 (one unit per decoder layer plus the root), so each rank holds about 1/N of them;
            checkpoints and ``final/`` still hold whole tensors (gathered to rank 0), so a run
            resumes under either mode. Same losses as ``ddp``. Full-weight training only: a model
            with frozen parameters (LoRA, QLoRA) is refused; use ``ddp`` for those.
        tensorboard: Log loss, lr, grad_norm, tokens_per_s and padding_ratio every step to
            ``output_dir/tensorboard/`` (``tensorboard --logdir`` it). None: when TensorBoard is
            installed (``pip install 'lmstack-train[tensorboard]'``); True: require it; False: off.
        compile: ``torch.compile`` each decoder layer but the last (regional: one graph serves every
            layer, so compile time does not grow with depth; the last stays eager so that it can run
            on the loss rows alone). Packed bins have a fixed shape, so the run compiles on its first
            step only; compile time, graphs and recompilations are reported apart from steady-state
            throughput. Needs a C compiler on CPU (gcc). Not with QLoRA, nor with ``parallel.tp``
            (with the other ``parallel:`` dims each rank compiles the layers it holds before FSDP2).
        fused_loss: Compute the output head and the cross-entropy together in chunks of rows, never
            holding the ``[loss tokens, vocabulary]`` logits (language-modelling objectives; same loss
            and gradients as the plain path, up to float summation order).
        measure_activations: Before training, measure the activation memory per token with and
            without checkpointing on the first micro-batch (two forwards, no backward) for the run
            summary.
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
    precision: Literal["float32", "bfloat16", "bfloat16-mp"] = "float32"
    activation_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool | None = None
    compile: bool = False
    fused_loss: bool = True
    measure_activations: bool = True


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class TrainResult:
    """What a finished run reports; :meth:`summary` turns it into the text ``lmstack train`` prints.

    Totals (``tokens``, ``best_loss``, ``padding_ratio``) cover the whole run, including steps done
    before a resume; times and throughput cover this process's part.

    Attributes:
        steps: Optimizer steps of the whole run (``run.max_steps``).
        final_loss: The loss of the last step.
        tokens: Tokens trained on over the whole run (padding excluded).
        seconds: Wall time of this call, from the first step to the written final model.
        model_dir: The final model (``output_dir/final``).
        losses: The loss of every step this call ran.
        start_step: The step this call resumed from (0: a fresh run).
        tokens_this_call: Tokens trained on by this call (``tokens`` less those before the resume).
        best_loss: The lowest step loss of the run.
        best_step: The step that had it.
        tokens_per_s: Mean throughput of this call: its tokens over its training time (checkpoint
            writes included, the final save not).
        padding_ratio: The share of batch slots that were padding, over the run.
        peak_memory_bytes: The peak memory of the most demanding rank (see ``peak_memory_kind``).
        peak_memory_kind: ``CUDA max allocated`` (tensors on the GPU) or ``process peak RSS`` (CPU).
        output_dir: The run directory.
        last_checkpoint: The newest checkpoint left in ``output_dir/checkpoints`` (None if none).
        metrics_file: ``metrics.jsonl``.
        tensorboard_dir: Where TensorBoard events went, or None when it was off.
        world_size: Processes that trained.
        data_parallel: ``none`` (one process), ``ddp``, ``fsdp`` or ``mesh`` (a ``parallel:`` layout).
        layout: The ``parallel:`` degrees a ``mesh`` run trained with (``dp_replicate=1 dp_shard=2 ...``).
        objective: What was minimised: ``lm`` (next-token cross-entropy), ``dpo``, ``orpo``,
            ``simpo``, ``kto`` or ``rm``.
        metrics: The last step's objective metrics (preference runs: ``rewards/chosen``,
            ``rewards/rejected``, ``margins``, ``accuracy`` ...); None where a step had nothing to
            average (a KTO step without desirable samples).
        activation_bytes_per_token: Bytes autograd saved for backward per real token of the first
            micro-batch, without activation checkpointing (0: not measured).
        activation_bytes_per_token_checkpointed: The same with activation checkpointing.
        activation_checkpointing: Whether the run checkpointed activations.
        compiled: Whether the decoder layers were compiled (``run.compile``).
        compile_seconds: Time the compiling steps took beyond a steady step.
        compiled_graphs: Graphs compiled by this call's training steps.
        recompilations: Graphs compiled after the first compiling step (0 when shapes stay fixed).
        steady_tokens_per_s: Tokens per second over the steps that compiled nothing (compiled runs).
    """

    steps: int
    final_loss: float
    tokens: int
    seconds: float
    model_dir: Path
    losses: list[float]
    start_step: int = 0
    tokens_this_call: int = 0
    best_loss: float = math.nan
    best_step: int = 0
    tokens_per_s: float = 0.0
    padding_ratio: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "unknown"
    output_dir: Path | None = None
    last_checkpoint: Path | None = None
    metrics_file: Path | None = None
    tensorboard_dir: Path | None = None
    world_size: int = 1
    data_parallel: str = "none"
    layout: str = ""
    objective: str = "lm"
    metrics: dict[str, float | None] = field(default_factory=dict)
    activation_bytes_per_token: float = 0.0
    activation_bytes_per_token_checkpointed: float = 0.0
    activation_checkpointing: bool = False
    compiled: bool = False
    compile_seconds: float = 0.0
    compiled_graphs: int = 0
    recompilations: int = 0
    steady_tokens_per_s: float = 0.0

    def summary(self) -> str:
        """A human summary of the run: steps, tokens, time, losses, padding, memory, where things are."""
        how = "1 process" if self.world_size == 1 else f"{self.world_size} processes ({self.data_parallel})"
        if self.layout:
            how = f"{self.world_size} processes ({self.layout})"
        resumed = f", resumed at step {self.start_step}" if self.start_step else ""
        best = f"{self.best_loss:.4f} (step {self.best_step})" if math.isfinite(self.best_loss) else "n/a"
        tokens = f"{self.tokens:,}"
        if self.start_step:
            tokens += f" ({self.tokens_this_call:,} in this call)"
        memory = "unknown"
        if self.peak_memory_bytes:
            per = ", largest rank" if self.world_size > 1 else ""
            memory = f"{_size(self.peak_memory_bytes)} ({self.peak_memory_kind}{per})"
        checkpoints = "none kept"
        if self.last_checkpoint is not None:
            checkpoints = f"{self.last_checkpoint.parent} (latest: {self.last_checkpoint.name})"
        lines = [
            f"Training finished: {self.steps} steps ({len(self.losses)} in this call{resumed}) on {how}",
            f"  tokens        {tokens} in {self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s)",
            f"  loss          final {self.final_loss:.4f}, best {best}"
            + (f" ({self.objective})" if self.objective != "lm" else ""),
            f"  padding       {self.padding_ratio:.1%} of batch slots",
            f"  peak memory   {memory}",
            f"  final model   {self.model_dir}",
            f"  checkpoints   {checkpoints}",
        ]
        if self.activation_bytes_per_token:
            on, off = self.activation_bytes_per_token_checkpointed, self.activation_bytes_per_token
            used = "with" if self.activation_checkpointing else "without"
            lines.insert(
                -2,
                f"  activations   {_size(off)}/token saved for backward without checkpointing, "
                f"{_size(on)}/token with it (this run: {used})",
            )
        if self.compiled:
            lines.insert(
                2,
                f"  compile       {self.compile_seconds:.1f} s on the first step(s), {self.compiled_graphs} "
                f"graphs, {self.recompilations} recompilations after; steady state "
                f"{self.steady_tokens_per_s:,.0f} tokens/s",
            )
        if self.metrics:
            shown = ", ".join(
                f"{name} {'n/a' if v is None else format(v, '.4f')}" for name, v in self.metrics.items()
            )
            lines.insert(3, f"  last step     {shown}")
        if self.metrics_file is not None:
            lines.append(f"  metrics       {self.metrics_file}")
        if self.tensorboard_dir is not None:
            lines.append(f"  tensorboard   tensorboard --logdir {self.tensorboard_dir}")
        return "\n".join(lines)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain floating tensors on one CPU or CUDA device.

    One kernel per parameter instead of about ten ops: on the SFT benchmark's 11.7M llama (57 tensors),
    one thread, 10.2-10.6 ms a step against 34.3-46.4 ms (for-loop) and 36.7-37.3 ms (foreach). Sharded
    (DTensor) and other parameters keep the default implementation.
    """
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    )


def _local_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients held by this process (an FSDP2 gradient's local shard, not the DTensor)."""
    grads = []
    for p in params:
        if p.grad is not None:
            grads.append(getattr(p.grad, "_local_tensor", p.grad))
    return grads


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared L2 norm of all ``grads`` together, in fp32 (0 when there are none)."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack([n.float() for n in norms]).square().sum()


class PartOptimizers(torch.optim.Optimizer):
    """Several optimizers (one per pipeline stage of a rank) driven as one, for the loop and its scheduler.

    The parameter groups are the optimizers' own dictionaries, so a learning-rate scheduler built on
    this object sets every optimizer's rate.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        # No Optimizer.__init__: the groups and states stay the parts' own.
        self.optimizers = list(optimizers)
        self.defaults = dict(optimizers[0].defaults)
        self.param_groups = [group for opt in optimizers for group in opt.param_groups]
        self.state = {}  # type: ignore[assignment]
        self._optimizer_step_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_step_post_hooks = {}  # type: ignore[assignment]

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Step every optimizer."""
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every optimizer's gradients."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def _batches(loader: ResumableLoader[Any]) -> Iterator[Any]:
    while True:  # epochs follow each other; the loader advances its own position
        yield from loader


class _Training:
    """One run of the loop, in the shape of a torchtune recipe.

    :meth:`setup`, then :meth:`run`, which repeats :meth:`train_step`, :meth:`log` and (every
    ``save_every`` steps) :meth:`save_checkpoint`, and ends with :meth:`save_final` and
    :meth:`result`.

    The arguments (and those of :meth:`setup` and :meth:`run`) are :func:`train_loop`'s.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        data: DataConfig,
        optim: OptimConfig,
        run: RunConfig,
        objective: Objective | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        # A parallel: section beyond plain data parallelism trains over the 5-D mesh (MeshModel).
        self.parallel = parallel if parallel is not None and not parallel.is_default else None
        self.mesh_model: Any = None
        self.data, self.optim, self.run_config = data, optim, run
        self.objective = objective if objective is not None else LanguageModeling(fused=run.fused_loss)
        self.last_metrics: dict[str, float | None] = {}
        self.out = Path(run.output_dir)
        self.metrics_file = self.out / "metrics.jsonl"
        self.final = self.out / "final"
        self.losses: list[float] = []
        self.loss_value = float("nan")
        self.start_step = self.tokens_seen = 0
        # Run-wide totals for the summary, carried through checkpoints.
        self.best_loss, self.best_step, self.padded_tokens, self.padded_slots = math.inf, 0, 0, 0
        self.activations: ActivationMemory | None = None
        self.compile_watch: CompileWatch | None = None
        self.step_tokens: list[int] = []

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self, config_to_save: Any = None) -> None:
        """Checks the settings, places (and shards) the model, builds data, optimizer and schedule.

        Then resumes from the newest checkpoint of ``output_dir``, if any.
        """
        model, run = self.model, self.run_config
        if (
            self.parallel is None
            and run.data_parallel == "fsdp"
            and any(not p.requires_grad for p in model.parameters())
        ):
            raise TrainError(
                "run.data_parallel='fsdp' shards full-weight training only, and this model has frozen "
                "parameters (a LoRA or QLoRA base); shard LoRA with a parallel: {dp_shard: N} section, "
                "or use run.data_parallel='ddp' (QLoRA trains with ddp only)."
            )
        tensorboard = use_tensorboard(run.tensorboard)  # before any work, so a missing package fails fast
        self.tb_dir = self.out / "tensorboard" if tensorboard else None
        self.out.mkdir(parents=True, exist_ok=True)
        self.info = init_distributed(run.device)
        self.device = self.info.device
        if (
            run.precision == "bfloat16-mp"
            and self.parallel is None
            and (run.data_parallel != "fsdp" or self.info.world_size == 1)
        ):
            raise TrainError(
                "run.precision: bfloat16-mp is FSDP2's mixed precision and needs sharded weights: run "
                "under torchrun with run.data_parallel: fsdp (or a parallel: layout that shards), or use "
                "run.precision: bfloat16 (autocast) here."
            )
        if config_to_save is not None and self.info.is_main:
            save_config(config_to_save, self.out / "config.yaml")
        torch.manual_seed(run.seed)
        model.to(self.device).train()
        if run.activation_checkpointing and self.parallel is None:
            model.enable_activation_checkpointing()
        if run.data_parallel == "fsdp" and self.info.world_size == 1:
            logger.info("run.data_parallel='fsdp' has nothing to shard in one process; training unsharded")
        self.dataset = self.objective.build_dataset(self.data, self.tokenizer)
        self.data_rank, self.data_size = self.info.rank, self.info.world_size
        if self.parallel is not None:
            from lmstack.train._parallel import MeshModel

            self.mesh_model = MeshModel(
                model,
                self.parallel,
                self.info,
                self.objective,
                activation_checkpointing=run.activation_checkpointing,
                mixed_precision=run.precision == "bfloat16-mp",
                compile=run.compile,
                # Pipeline stages hold a part of the model each: the reference is scored with the whole
                # model before the split (every rank holds it until then), each rank a share of the bins.
                before_split=self._setup_reference if self.parallel.pp > 1 else None,
            )
            self.data_rank, self.data_size = self.mesh_model.data_rank, self.mesh_model.data_size
        self.loader: ResumableLoader[Any] = self._new_loader()
        # On the plain model (before compiling and wrapping); a language model's forward only (a reward
        # model's head takes other arguments and is not measured).
        if run.measure_activations and isinstance(model, CausalLM):
            first = next(iter(self._new_loader())).to(self.device)
            fused = bool(getattr(self.objective, "fused", False))
            self.activations = measure_activation_memory(
                model, first, autocast=run.precision == "bfloat16", fused_loss=fused
            )
        self.compile_watch = CompileWatch() if run.compile else None
        if run.compile and self.mesh_model is None:
            compile_decoder_layers(model)
        # Under torchrun each rank holds a replica (DDP) or a shard (FSDP2); both average gradients.
        if self.mesh_model is not None:
            self.dp = DataParallel(model, "mesh")
        else:
            self.dp = wrap_data_parallel(
                model, self.info, run.data_parallel, mixed_precision=run.precision == "bfloat16-mp"
            )
        self._setup_optimizer()
        self._setup_reference()  # before resuming: the model must still be the reference
        self._resume()
        self.start_tokens = self.tokens_seen
        source = self.mesh_model.parameters() if self.mesh_model is not None else model.parameters()
        self.params = [p for p in source if p.requires_grad]
        self.batches = _batches(self.loader)

    def _new_loader(self) -> ResumableLoader[Any]:
        return ResumableLoader(
            self.dataset,
            self.run_config.batch_size,
            seed=self.data.shuffle_seed,
            shuffle=self.data.shuffle,
            rank=self.data_rank,
            world_size=self.data_size,
        )

    def _setup_optimizer(self) -> None:
        optim, run = self.optim, self.run_config
        # Built after sharding: FSDP2 replaces the parameters by DTensor shards.
        optimizers = []
        for part in self._parts():
            groups = _param_groups(part, optim.weight_decay)
            optimizers.append(
                torch.optim.AdamW(
                    groups,
                    lr=optim.lr,
                    betas=(optim.betas[0], optim.betas[1]),
                    eps=optim.eps,
                    fused=_fusable(groups) or None,
                )
            )
        # A pipeline rank holding several stages has one optimizer per stage (distributed checkpoints
        # name each stage's states by its own parameters), stepped together.
        self.optimizer = optimizers[0] if len(optimizers) == 1 else PartOptimizers(optimizers)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s,
                total_steps=run.max_steps,
                warmup_steps=optim.warmup_steps,
                decay=optim.decay,
                min_ratio=optim.min_lr_ratio,
            ),
        )

    def _parts(self) -> list[torch.nn.Module]:
        """The model parts this rank trains: the model, or a pipeline rank's stages."""
        if self.mesh_model is not None:
            return list(self.mesh_model.parts)
        return [self.model]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        if isinstance(self.optimizer, PartOptimizers):
            return list(self.optimizer.optimizers)
        return [self.optimizer]

    def _setup_reference(self) -> None:
        objective = self.objective
        if not objective.needs_reference or objective.reference is not None:
            return
        run, mm = self.run_config, self.mesh_model
        objective.reference = prepare_reference(
            self.model if mm is None else mm.scorer,
            self.dataset,
            paired=objective.primary == "pairs",
            mode=objective.reference_mode,
            model_tag=objective.reference_tag,
            cache_root=Path(self.data.cache_dir) if self.data.cache_dir else self.out,
            batch_size=run.batch_size,
            device=self.device,
            precision=run.precision,
            rank=self.data_rank,
            world_size=self.data_size,
            chunk_size=getattr(objective, "chunk_size", None),
            duplicates=1 if mm is None else mm.duplicates,
        )

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return
        if self.run_config.resume == "never":
            raise TrainError(
                f"{self.out} already holds checkpoint {ckpt.name}; use resume=auto or a new output_dir."
            )
        if is_distributed_checkpoint(ckpt):
            state = load_distributed_checkpoint(
                ckpt, parts=self._parts(), optimizers=self._optimizers(), scheduler=self.scheduler
            )
        elif self.mesh_model is not None and self.mesh_model.mesh.dims.pp > 1:
            raise TrainError(
                f"{ckpt} holds whole tensors (a data-parallel run's checkpoint); a pipeline-parallel run "
                "resumes from distributed checkpoints only. Resume it without parallel.pp first."
            )
        else:
            state = load_checkpoint(
                ckpt,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                sharded=self.dp.sharded,
            )
        self.loader.load_state_dict(state["data"])
        self.start_step, self.tokens_seen = int(state["step"]), int(state["tokens"])
        if state.get("best_loss") is not None:
            self.best_loss, self.best_step = float(state["best_loss"]), int(state["best_step"])
        # Checkpoints from before these counters existed: the ratio covers this call only.
        self.padded_tokens = int(state.get("padded_tokens", 0))
        self.padded_slots = int(state.get("padded_slots", 0))
        logger.info("resumed from %s (step %d)", ckpt, self.start_step)

    # -- one step ------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        """Runs optimizer step ``step + 1`` over ``grad_accum`` micro-batches.

        Returns:
            The step's metrics record (as written to ``metrics.jsonl``).

        Raises:
            TrainError: The step has no loss token, or a non-finite loss or gradient norm (the
                weights are then left as they were).
        """
        if self.mesh_model is not None:
            return self._mesh_step(step)
        run, info, device, dp = self.run_config, self.info, self.device, self.dp
        objective = self.objective
        t0 = time.perf_counter()
        window: list[Any] = [next(self.batches) for _ in range(run.grad_accum)]
        local = objective.step_totals(window)
        # The tokens and slots the step computes ride along in the step's collective.
        local["real tokens"] = float(sum(b.num_tokens for b in window))
        local["slots"] = float(sum(b.input_ids.numel() for b in window))
        # Normalise by the totals of the whole step on every rank (loss tokens, pairs ...); the
        # gradient average over ranks (DDP all-reduce, FSDP2 reduce-scatter) divides by the world
        # size, which the objective's factor undoes. An objective whose loss is one sum over the
        # step's total (language modelling) is normalised after backward instead, so the totals, the
        # loss and (sharded) the gradient norm share one all-reduce; the others need their totals
        # before the forward.
        deferred = objective.deferred_normalization
        if deferred:
            if info.world_size == 1 and local[objective.primary] == 0:
                raise TrainError(
                    f"step {step + 1} has no token to learn from; check data.train_on and the data."
                )
            totals = {objective.primary: 1.0}
        else:
            totals = dict(zip(local, all_reduce_sums(list(local.values()), device), strict=True))
        autocast = run.precision == "bfloat16"
        total = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(window):
            b = micro.to(device)
            # Gradients of earlier micro-batches accumulate locally; the last one communicates.
            with dp.gradient_sync(i == len(window) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, metric_sums = objective.loss(dp.module, b, totals, info.world_size)
                loss.backward()
            total += loss.detach()
            for name, value in metric_sums.items():
                sums[name] = sums[name] + value if name in sums else value
        names = sorted(sums)
        # float64: token and slot counts stay exact past 2**24.
        vector = [total.double(), *(sums[n].double() for n in names)]
        grads = _local_grads(self.params)
        if deferred:
            vector += [torch.tensor(v, dtype=torch.float64, device=device) for v in local.values()]
            if dp.sharded:  # each rank holds a shard of the gradient: its squared norm adds up
                vector.append(_squared_norm(grads, device).double())
        # One collective for the loss, every metric sum (and, deferred, the totals and norm).
        values = all_reduce_tensor_sum(torch.stack(vector)).tolist()
        if deferred:
            reduced = values[len(names) + 1 : len(names) + 1 + len(local)]
            totals = dict(zip(local, reduced, strict=True))
        step_tokens, slots = int(totals.pop("real tokens")), int(totals.pop("slots"))
        if totals[objective.primary] == 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainError(f"step {step + 1} has no token to learn from; check data.train_on and the data.")
        scale = 1.0 / totals[objective.primary] if deferred else 1.0
        loss_value = values[0] * scale / info.world_size
        metrics: dict[str, float | None] = {}
        for name, value in zip(names, values[1 : len(names) + 1], strict=True):
            key = objective.denominators.get(name)
            denominator = totals[key] if key else 1.0
            metrics[name] = value / denominator if denominator else None
        if "rewards/chosen" in metrics and "margins" not in metrics:  # KTO: rewards of different samples
            chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
            metrics["margins"] = None if chosen is None or rejected is None else chosen - rejected
        self.last_metrics = metrics
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        if deferred:
            squared = values[-1] if dp.sharded else float(_squared_norm(grads, device))
            grad_norm = math.sqrt(squared) * scale
            # Normalisation and clipping in one pass over the gradients (torch's clipping rule).
            factor = scale * min(1.0, clip / (grad_norm + 1e-6))
            if grads and math.isfinite(grad_norm):
                torch._foreach_mul_(grads, factor)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            # With FSDP2 the norm is a replicated DTensor already reduced over every rank's shards.
            grad_norm = scalar_value(norm)
        return self._finish_step(step, t0, loss_value, grad_norm, (step_tokens, slots), totals, metrics)

    def _finish_step(
        self,
        step: int,
        t0: float,
        loss_value: float,
        grad_norm: float,
        counts: tuple[int, int],
        totals: dict[str, float],
        metrics: dict[str, float | None],
    ) -> dict[str, Any]:
        """Refuse a non-finite step, else update the weights and the counters; the step's record."""
        step_tokens, slots = counts
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            last = latest_checkpoint(self.out)
            raise TrainError(
                f"non-finite {what} at step {step + 1}; "
                f"the weights were not updated. Last good checkpoint: {last or 'none'}. "
                "Lower optim.lr, raise warmup, or check the data."
            )
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += step_tokens
        self.padded_tokens, self.padded_slots = self.padded_tokens + step_tokens, self.padded_slots + slots
        if loss_value < self.best_loss:
            self.best_loss, self.best_step = loss_value, step + 1
        self.loss_value = loss_value
        self.losses.append(loss_value)
        seconds = time.perf_counter() - t0
        self.step_tokens.append(step_tokens)
        compiled = {}
        if self.compile_watch is not None:
            compiled["compiled_graphs"] = self.compile_watch.step(seconds)
        return {
            "step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens": self.tokens_seen, **{k: int(v) for k, v in totals.items()},
            "tokens_per_s": step_tokens / max(seconds, 1e-9), "step_seconds": seconds,
            "padding_ratio": 1 - step_tokens / max(slots, 1), **compiled, **metrics,
        }  # fmt: skip

    def _mesh_step(self, step: int) -> dict[str, Any]:
        """:meth:`train_step` over a ``parallel:`` layout (:class:`~lmstack.train._parallel.MeshModel`).

        Every tp, sp and pp rank of a data-parallel coordinate reads the same micro-batches, so the
        step's totals are a world sum divided by those duplicates; the loss each rank adds is already
        normalised, and the world sum of it counts each token once per tp rank.
        """
        run, device, mm, objective = self.run_config, self.device, self.mesh_model, self.objective
        t0 = time.perf_counter()
        window: list[Any] = [next(self.batches) for _ in range(run.grad_accum)]
        local = objective.step_totals(window)
        local["real tokens"] = float(sum(b.num_tokens for b in window))
        local["slots"] = float(sum(b.input_ids.numel() for b in window))
        summed = all_reduce_sums(list(local.values()), device)
        totals = {k: v / mm.duplicates for k, v in zip(local, summed, strict=True)}
        if totals[objective.primary] == 0:
            raise TrainError(f"step {step + 1} has no token to learn from; check data.train_on and the data.")
        autocast = run.precision == "bfloat16"
        sums: dict[str, torch.Tensor] = {}
        if mm.pipelined:
            total, sums = mm.pipeline_step(
                [b.to(device) for b in window], totals, autocast=autocast, objective=objective
            )
        else:
            total = torch.zeros((), device=device)
            for i, micro in enumerate(window):
                loss, metric_sums = mm.micro_step(
                    objective, micro.to(device), totals, last=i == len(window) - 1, autocast=autocast
                )
                total += loss
                for name, value in metric_sums.items():
                    sums[name] = sums[name] + value if name in sums else value
        names = sorted(sums)
        vector = torch.stack([total.double(), *(sums[n].double() for n in names)])
        values = all_reduce_tensor_sum(vector).tolist()
        tp = mm.mesh.dims.tp
        loss_value = values[0] / tp / mm.loss_factor
        metrics: dict[str, float | None] = {}
        for name, value in zip(names, values[1:], strict=True):
            key = objective.denominators.get(name)
            denominator = totals[key] if key else 1.0
            metrics[name] = value / tp / denominator if denominator else None
        if "rewards/chosen" in metrics and "margins" not in metrics:
            chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
            metrics["margins"] = None if chosen is None or rejected is None else chosen - rejected
        self.last_metrics = metrics
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        grad_norm = mm.clip_gradients(clip)
        counts = (round(totals.pop("real tokens")), round(totals.pop("slots")))
        return self._finish_step(step, t0, loss_value, grad_norm, counts, totals, metrics)

    def log(self, record: dict[str, Any]) -> None:
        """Writes a step's record to metrics.jsonl and TensorBoard, and moves the progress bar."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.writer is not None:
            for name in (*SCALARS, *self.last_metrics):
                if record.get(name) is not None:
                    self.writer.add_scalar(f"train/{name}", record[name], record["step"])
        self.bar.update(1)
        if record["step"] % max(self.run_config.log_every, 1) == 0:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    # -- saving --------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """Writes the checkpoint of ``step`` (a collective: every rank calls it)."""
        info, dp = self.info, self.dp
        if self.mesh_model is not None:
            # Every rank writes its own shards; nothing is gathered to one rank.
            save_distributed_checkpoint(
                self.out,
                step,
                parts=self._parts(),
                optimizers=self._optimizers(),
                scheduler=self.scheduler,
                trainer_state=self._trainer_state(),
                keep_last=self.run_config.keep_last,
            )
            if self.writer is not None:
                self.writer.flush()
            return
        # Gathering shards takes every rank; replicas are identical, so then only rank 0 reads.
        gather = dp.sharded or info.is_main
        weights, optim_state = (
            gather_train_state(self.model, self.optimizer, sharded=dp.sharded) if gather else ({}, {})
        )
        if info.is_main:  # one rank writes
            save_checkpoint(
                self.out,
                step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                trainer_state=self._trainer_state(),
                keep_last=self.run_config.keep_last,
                model_state=weights,
                optimizer_state=optim_state,
            )
            if self.writer is not None:  # what TensorBoard shows survives a kill, like the checkpoint
                self.writer.flush()
        barrier()

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "data": self.loader.state_dict(),
            "tokens": self.tokens_seen,
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "padded_tokens": self.padded_tokens,
            "padded_slots": self.padded_slots,
        }

    def save_final(self, save_model: Callable[[CausalLM, Path], None] | None = None) -> None:
        """Writes the final model to ``output_dir/final`` (a collective under FSDP)."""
        self.model.eval()
        if self.mesh_model is not None:
            whole = self.mesh_model.whole_model(self.out / ".final-shards")
        else:
            # Every rank takes part in the gather.
            whole = unsharded_model(self.model, sharded=self.dp.sharded)
        if self.info.is_main:
            assert whole is not None
            if save_model is not None:
                save_model(whole, self.final)
            else:
                save_pretrained(whole, self.final, tokenizer=self.tokenizer)
        barrier()

    # -- the run -------------------------------------------------------------------------------------

    def run(self, save_model: Callable[[CausalLM, Path], None] | None = None) -> TrainResult:
        """Trains from the resumed step to ``run.max_steps``, saving on the way and at the end."""
        run, info = self.run_config, self.info
        self.metrics = self.metrics_file.open("a", encoding="utf-8") if info.is_main else None
        self.writer: ScalarWriter | None = None
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=run.max_steps,
            initial=self.start_step,
            desc="Training",
            unit="step",
            disable=not info.is_main or None,
        )
        try:
            if self.tb_dir is not None and info.is_main:
                # purge_step: points a killed run logged after its last checkpoint are replaced.
                purge = self.start_step + 1 if self.start_step else None
                self.writer = open_tensorboard(self.tb_dir, purge_step=purge)
            if self.compile_watch is not None:
                self.compile_watch.start()
            for step in range(self.start_step, run.max_steps):
                self.log(self.train_step(step))
                if run.save_every and (step + 1) % run.save_every == 0 and step + 1 < run.max_steps:
                    self.save_checkpoint(step + 1)
            self.train_seconds = time.perf_counter() - self.started
            self.save_final(save_model)
        finally:
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.writer is not None:
                self.writer.close()
        return self.result()

    def result(self) -> TrainResult:
        """The finished run's :class:`TrainResult` (a collective: the peak memory is reduced)."""
        seconds = time.perf_counter() - self.started
        memory, memory_kind = peak_memory(self.device)
        logger.info(
            "finished %d steps in %.1f s; final loss %.4f; model in %s",
            self.run_config.max_steps,
            seconds,
            self.loss_value,
            self.final,
        )
        this_call = self.tokens_seen - self.start_tokens
        watch, act = self.compile_watch, self.activations
        steady = 0.0
        if watch is not None:
            quiet = [
                (n, s)
                for n, s, g in zip(self.step_tokens, watch.step_seconds, watch.per_step, strict=True)
                if not g
            ]
            steady = sum(n for n, _ in quiet) / max(sum(s for _, s in quiet), 1e-9)
        return TrainResult(
            steps=self.run_config.max_steps,
            final_loss=self.loss_value,
            tokens=self.tokens_seen,
            seconds=seconds,
            model_dir=self.final,
            losses=self.losses,
            start_step=self.start_step,
            best_loss=self.best_loss if self.best_step else math.nan,
            best_step=self.best_step,
            tokens_this_call=this_call,
            tokens_per_s=this_call / max(self.train_seconds, 1e-9),
            padding_ratio=1 - self.padded_tokens / self.padded_slots if self.padded_slots else 0.0,
            peak_memory_bytes=int(all_reduce_max(memory, self.device)),
            peak_memory_kind=memory_kind,
            output_dir=self.out,
            last_checkpoint=latest_checkpoint(self.out),
            metrics_file=self.metrics_file,
            tensorboard_dir=self.tb_dir,
            world_size=self.info.world_size,
            data_parallel=self.dp.mode,
            layout=self.mesh_model.mesh.dims.describe() if self.mesh_model is not None else "",
            objective=self.objective.name,
            metrics=dict(self.last_metrics),
            activation_bytes_per_token=act.per_token if act else 0.0,
            activation_bytes_per_token_checkpointed=act.per_token_checkpointed if act else 0.0,
            activation_checkpointing=self.run_config.activation_checkpointing,
            compiled=watch is not None,
            compile_seconds=watch.compile_seconds if watch else 0.0,
            compiled_graphs=watch.graphs if watch else 0,
            recompilations=watch.recompilations if watch else 0,
            steady_tokens_per_s=steady,
        )


def train_loop(
    model: CausalLM,
    tokenizer: Tokenizer,
    data: DataConfig,
    optim: OptimConfig,
    run: RunConfig,
    *,
    config_to_save: Any = None,
    save_model: Callable[[CausalLM, Path], None] | None = None,
    objective: Objective | None = None,
    parallel: ParallelConfig | None = None,
) -> TrainResult:
    """Train ``model`` on ``data``; resume from ``run.output_dir`` when a checkpoint is there.

    Args:
        model: The model to train (its trainable parameters are those with ``requires_grad``). With
            ``run.data_parallel='fsdp'`` under torchrun it is sharded in place.
        tokenizer: Its tokenizer (tokenizes the data, saved with the final model).
        data: The data config (``data.shuffle`` and ``data.shuffle_seed`` set the batch order).
        optim: Optimizer and schedule.
        run: Steps, batching, checkpoints, data parallelism, TensorBoard.
        config_to_save: The full recipe config, written to ``config.yaml`` in the run directory.
        save_model: How to write the final model (default: a Hugging Face directory with the
            tokenizer, via lmstack-core's ``save_pretrained``). It gets a model with whole weights
            (an FSDP run's is gathered on rank 0) and runs on rank 0 only.
        objective: What a step minimises (default: next-token cross-entropy on ``data``'s loss
            tokens); the preference recipes pass a DPO/ORPO/SimPO/KTO/reward-model objective
            (:mod:`lmstack.train._objectives`), which also builds the dataset.
        parallel: The recipe's ``parallel:`` section. Left at its defaults (or None) the run is data
            parallel as ``run.data_parallel`` says; otherwise the model is trained over the 5-D mesh of
            tensor, sequence, pipeline and sharded data parallelism (:mod:`lmstack.train._parallel`),
            with distributed checkpoints.

    Returns:
        Steps, losses, tokens, time, throughput, padding, peak memory and where the run wrote.

    Raises:
        TrainError: on a non-finite loss or gradient (the last checkpoint stays intact), when
            ``resume='never'`` and the run directory already holds checkpoints, when
            ``run.tensorboard`` is true and TensorBoard is not installed, or when
            ``run.data_parallel='fsdp'`` meets a model with frozen parameters (LoRA, QLoRA).
    """
    training = _Training(model, tokenizer, data, optim, run, objective, parallel)
    training.setup(config_to_save)
    return training.run(save_model)
