"""Tensor-parallel serving: one engine process (rank 0) and ``N - 1`` worker processes.

The engine process keeps everything that decides what runs (the scheduler, the KV block manager, the
sampler, the detokenizers) and is tensor-parallel rank 0; :class:`TensorParallelGroup` starts the
other ranks as ``python -m lmstack.infer.engine._tp_worker`` processes. Every rank loads the
checkpoint, joins one torch.distributed process group (gloo on CPU, NCCL on CUDA, rendezvous on a
TCP store that rank 0 hosts on 127.0.0.1), shards the model with lmstack-core's
:func:`~lmstack.core.parallel.apply_tensor_parallel` over a 1-D mesh of the ranks, and allocates a KV
cache for its own key-value heads only (so a byte budget per rank holds ``N`` times the tokens).

Each engine step rank 0 broadcasts the step's model inputs (:class:`ModelStep`: token ids, positions,
KV slots, query and context lengths, block tables, the RoPE lengths and the rows to sample) as one
small header tensor and one flat int64 tensor, and every rank runs the same forward; the logits come
out whole on every rank (the output head gathers the vocabulary), and only rank 0 samples. Requests,
aborts and finished sequences change rank 0's bookkeeping alone: the block tables travel every step.

The header and the payload travel on a gloo group of their own (CPU tensors) whose timeout is
effectively unbounded, because a worker waits on it for as long as the server is idle; the model's
collectives run on the default group with a bounded timeout. Rank 0 checks that its workers are
alive before each step, and a collective that fails because a peer is gone (gloo notices a closed
connection at once) becomes an :class:`~lmstack.infer.InferError` naming the worker and quoting its
log. Workers exit on a stop header (:meth:`TensorParallelGroup.close`), or on their own when rank 0's
process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lmstack.core import CausalLM, ConfigError, ModelConfig, load_config, load_pretrained
from lmstack.core.parallel import apply_tensor_parallel, check_tensor_parallel
from lmstack.infer._errors import InferError

__all__ = [
    "ModelStep",
    "TensorParallelGroup",
    "WorkerSpec",
    "check_tensor_parallel_model",
    "local_model_config",
    "receive_step",
    "shard_model",
]

logger = logging.getLogger(__name__)

#: The environment variable a worker reads its :class:`WorkerSpec` (JSON) from.
SPEC_ENV = "LMSTACK_TP_WORKER_SPEC"
# Store keys of the handshake (the default group's own keys live under another prefix).
_KEY = "lmstack/tp"
# How long a collective of the forward (or the start-up) may wait before it fails. Long enough
# for a large checkpoint's first CUDA step; a dead peer is noticed at once anyway.
STEP_TIMEOUT = datetime.timedelta(minutes=10)
STARTUP_TIMEOUT_S = 600.0
# The control group's timeout: workers wait on it for the next step while the server is idle.
_IDLE_TIMEOUT = datetime.timedelta(days=3650)
# Header of a broadcast step: command, tokens, sequences, block-table entries, RoPE lengths (0/1),
# sampled rows, two spare slots.
_HEADER = 8
_STEP, _STOP = 1, 0


@dataclass
class ModelStep:
    """What one forward of the engine needs: the flattened batch and its paged-attention metadata.

    Attributes:
        token_ids: ``[N]`` int64 token ids.
        positions: ``[N]`` int64 positions.
        slot_mapping: ``[N]`` int64 KV-cache slot of each token (on the CPU).
        query_lens: Tokens of each sequence in this step (consecutive in the batch).
        context_lens: Each sequence's length after this step.
        block_tables: Each sequence's block table.
        rope_seq_lens: ``[1, N]`` dynamic-NTK RoPE lengths, or None.
        sample_at: ``[S']`` batch index of each sampled row's last token, or None.
    """

    token_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: Sequence[Sequence[int]]
    rope_seq_lens: Tensor | None
    sample_at: Tensor | None


def _pack(step: ModelStep) -> tuple[Tensor, Tensor]:
    """The step as a header and one flat int64 CPU payload (see :func:`_unpack`)."""
    tables = step.block_tables
    flat: list[int] = []
    for table in tables:
        flat.extend(table)
    rope = step.rope_seq_lens
    parts = [
        step.token_ids.cpu(),
        step.positions.cpu(),
        step.slot_mapping.cpu(),
        torch.tensor(step.query_lens, dtype=torch.int64),
        torch.tensor(step.context_lens, dtype=torch.int64),
        torch.tensor([len(t) for t in tables], dtype=torch.int64),
        torch.tensor(flat, dtype=torch.int64),
    ]
    if rope is not None:
        parts.append(rope.reshape(-1).cpu())
    if step.sample_at is not None:
        parts.append(step.sample_at.cpu())
    payload = torch.cat([p.to(torch.int64) for p in parts])
    n = int(step.token_ids.numel())
    k = 0 if step.sample_at is None else int(step.sample_at.numel())
    header = torch.tensor(
        [_STEP, n, len(step.query_lens), len(flat), int(rope is not None), k, 0, 0], dtype=torch.int64
    )
    return header, payload


def _unpack(header: list[int], payload: Tensor, device: torch.device) -> ModelStep:
    """The :class:`ModelStep` that :func:`_pack` flattened, its model inputs moved to ``device``."""
    _, n, s, t, has_rope, k = header[:6]
    sizes = [n, n, n, s, s, s, t, n if has_rope else 0, k]
    ids, pos, slots, q_lens, ctx_lens, t_lens, flat, rope, sample = payload.split(sizes)
    flat_list = flat.tolist()
    tables: list[list[int]] = []
    start = 0
    for length in t_lens.tolist():
        tables.append(flat_list[start : start + length])
        start += length
    return ModelStep(
        token_ids=ids.to(device),
        positions=pos.to(device),
        slot_mapping=slots.clone(),
        query_lens=q_lens.tolist(),
        context_lens=ctx_lens.tolist(),
        block_tables=tables,
        rope_seq_lens=rope.reshape(1, n).to(device) if has_rope else None,
        sample_at=sample.to(device) if k else None,
    )


def receive_step(control: dist.ProcessGroup, device: torch.device) -> ModelStep | None:
    """On a worker: wait for rank 0's next step (None: the stop header)."""
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=control)
    values = header.tolist()
    if values[0] == _STOP:
        return None
    n, s, t, has_rope, k = values[1:6]
    payload = torch.empty(3 * n + 3 * s + t + (n if has_rope else 0) + k, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=control)
    return _unpack(values, payload, device)


def local_model_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The architecture one of ``tp`` ranks sees in attention: its share of the query and kv heads.

    The KV cache is sized and allocated from it (each rank stores its own kv heads only).
    """
    if tp == 1:
        return config
    assert config.num_key_value_heads is not None
    return config.replace(
        num_attention_heads=config.num_attention_heads // tp,
        num_key_value_heads=config.num_key_value_heads // tp,
        head_dim=config.head_dim,
    )


def check_tensor_parallel_model(model: CausalLM, tp: int) -> None:
    """Refuse a model that is not sharded over ``tp`` ranks by :func:`shard_model`.

    Raises:
        ConfigError: The model is not tensor-parallel, or over another number of ranks.
    """
    weight = model.model.layers[0].self_attn.q_proj.weight  # type: ignore[union-attr]
    size = weight.device_mesh.size() if isinstance(weight, DTensor) else 1
    if getattr(model, "_tensor_parallel", None) != "tensor" or size != tp:
        raise ConfigError(
            f"EngineConfig(tensor_parallel_size={tp}) needs a model sharded over {tp} ranks (without "
            f"sequence parallelism); this one is sharded over {size}. Serve a checkpoint with "
            f"LLM(path, tensor_parallel_size={tp}), which starts the workers and shards the model.",
            field="tensor_parallel_size",
        )


def shard_model(model: CausalLM, tp: int, device_type: str) -> CausalLM:
    """Shard ``model`` over the ``tp`` ranks of the default process group (in place).

    Sequence parallelism and loss parallelism stay off: every rank sees whole rows of the flattened
    batch (the paged attention backend indexes them), and the output head gathers the vocabulary so
    the logits are whole on every rank.
    """
    mesh = DeviceMesh(device_type, torch.arange(tp), mesh_dim_names=("tp",))
    return apply_tensor_parallel(model.eval(), mesh, sequence_parallel=False, loss_parallel=False)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to become rank ``rank`` (passed as JSON in :data:`SPEC_ENV`).

    Attributes:
        path: The checkpoint directory.
        rank: The worker's tensor-parallel rank (1 to ``world_size - 1``).
        world_size: The tensor-parallel degree.
        store_port: Port of rank 0's TCP store on 127.0.0.1.
        device: The worker's device (``"cpu"``, ``"cuda:1"``, ...).
        dtype: Weight dtype name, or None for the checkpoint's.
        engine: The :class:`~lmstack.infer.engine.EngineConfig` fields, JSON-able.
        parent_pid: Rank 0's process id; the worker exits when that process is gone.
        threads: torch threads of the worker (CPU).
        log_level: The worker's logging level.
    """

    path: str
    rank: int
    world_size: int
    store_port: int
    device: str
    dtype: str | None
    engine: dict[str, Any]
    parent_pid: int
    threads: int
    log_level: int = logging.WARNING

    def to_json(self) -> str:
        """The spec as a JSON string."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """The spec a JSON string holds."""
        return cls(**json.loads(text))


def backend_for(device_type: str) -> str:
    """The default group's backend on ``device_type``: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Where rank ``rank`` runs: the CPU, or CUDA device ``rank``."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def init_group(store: dist.Store, rank: int, world_size: int, device: torch.device) -> dist.ProcessGroup:
    """Join the default process group and create the control group; returns the control group."""
    options: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device
    dist.init_process_group(
        backend_for(device.type), store=store, rank=rank, world_size=world_size, timeout=STEP_TIMEOUT,
        **options,
    )  # fmt: skip
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    assert control is not None
    return control


def _json_engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """EngineConfig fields as JSON values (a torch dtype as its name)."""
    out = {}
    for name, value in options.items():
        out[name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    return out


class _Workers:
    """The worker processes and their shutdown; kept apart from the group so a finalizer can own it."""

    def __init__(self, logdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.logdir = logdir
        self.control: dist.ProcessGroup | None = None
        self.owns_default_group = False
        self.broken: str | None = None
        self.closed = False
        self.restore_threads: int | None = None  # rank 0's torch threads before the launch (CPU)

    def log_tail(self, index: int, limit: int = 3000) -> str:
        try:
            text = self.logs[index].read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:].strip() or "(empty log)"

    def dead(self) -> str | None:
        """A message about the workers that exited, the likely cause first; None while all run.

        One worker's death breaks the others' connections, and they exit too (status 1) before the
        next poll may run, so the one a signal killed (negative status) is named first, then by rank.
        """
        exited = [(index, code) for index, proc in enumerate(self.procs) if (code := proc.poll()) is not None]
        if not exited:
            return None
        exited.sort(key=lambda item: (item[1] >= 0, item[0]))
        index, code = exited[0]
        others = "".join(f"; rank {i + 1} exited too, with status {c}" for i, c in exited[1:])
        return (
            f"tensor-parallel worker rank {index + 1} (pid {self.procs[index].pid}) exited with status {code}"
            f"{others}; its log ends with:\n{self.log_tail(index)}"
        )

    def shutdown(self) -> None:
        """Stop the workers (a stop header, then a kill after a grace period) and leave the group."""
        if self.closed:
            return
        self.closed = True
        if self.control is not None and self.broken is None and self.dead() is None:
            try:
                dist.broadcast(torch.zeros(_HEADER, dtype=torch.int64), src=0, group=self.control)
            except Exception:  # a worker died meanwhile: it is killed below
                logger.debug("stop header not delivered", exc_info=True)
        # A clean stop lets the workers leave the group; after a failure nothing waits for them.
        deadline = time.monotonic() + (10 if self.broken is None else 0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel worker pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self.owns_default_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                logger.debug("destroying the process group failed", exc_info=True)
        self.control = None
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)
        shutil.rmtree(self.logdir, ignore_errors=True)  # errors already quoted what they needed


class TensorParallelGroup:
    """Rank 0's handle on the tensor-parallel workers: start, broadcast each step, stop.

    Create it with :meth:`launch`; :class:`~lmstack.infer.LLM` does so for
    ``LLM(path, tensor_parallel_size=N)``. Not thread-safe: only the engine's step calls
    :meth:`broadcast_step`.

    Attributes:
        size: The tensor-parallel degree (rank 0 included).
    """

    def __init__(self, size: int, workers: _Workers, store: dist.Store) -> None:
        self.size = size
        self._workers = workers
        self._store = store  # rank 0 hosts the rendezvous: it lives as long as the group
        # Runs on close(), when the group is collected, or at interpreter exit (finalize's atexit):
        # the workers never outlive an engine that forgot to close them.
        self._finalizer = weakref.finalize(self, workers.shutdown)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (ranks 1 to ``size - 1``)."""
        return [p.pid for p in self._workers.procs]

    @property
    def failure(self) -> str | None:
        """Why the group can run no more steps (a worker exited, a step failed), or None while it can."""
        workers = self._workers
        if workers.broken is None and not workers.closed:
            workers.broken = workers.dead()
        return workers.broken

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the group was finalized)."""
        return self._workers.closed

    @classmethod
    def launch(
        cls,
        path: str | os.PathLike[str],
        engine_options: dict[str, Any],
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[TensorParallelGroup, CausalLM]:
        """Start ``tensor_parallel_size - 1`` workers and shard rank 0's copy of the checkpoint.

        Args:
            path: The checkpoint directory every rank loads.
            engine_options: The :class:`~lmstack.infer.engine.EngineConfig` fields (the workers build
                the same engine to size their KV caches exactly as rank 0 does).
            dtype: Weight dtype (default: the checkpoint's).
            device: ``"cpu"`` (gloo), or ``"cuda"``: rank ``r`` on CUDA device ``r`` (NCCL). On the
                CPU every rank gets ``torch.get_num_threads() // N`` threads, rank 0 (this process)
                included until :meth:`close`.

        Returns:
            The group and rank 0's sharded model.

        Raises:
            ConfigError: The degree does not divide the heads or the feed-forward width, the
                checkpoint is quantized, the device cannot hold the ranks, or this process already
                has a torch.distributed process group.
            InferError: A worker failed to start (its log is quoted).
        """
        tp = int(engine_options.get("tensor_parallel_size", 1))
        path = os.fspath(path)
        model_config = load_config(path)
        try:
            check_tensor_parallel(model_config, tp)
        except ConfigError as exc:
            if exc.field is None:
                raise
            # Core names the degrees that divide the model; here the degree is a serving option.
            raise ConfigError(
                f"{exc} Serve with one of them as tensor_parallel_size (lmstack serve --tp).", field=exc.field
            ) from exc
        _check_unsupported(path, engine_options)
        if dist.is_initialized():
            raise ConfigError(
                "LLM(tensor_parallel_size>1) starts its own torch.distributed process group, but this "
                "process already has one (torchrun, or another tensor-parallel LLM not closed yet); "
                "close the other LLM first, or serve from a process outside torchrun.",
                field="tensor_parallel_size",
            )
        base = torch.device(device)
        if base.type not in ("cpu", "cuda"):
            raise ConfigError(
                f"tensor-parallel serving runs on 'cpu' or 'cuda', not {base.type!r}.", field="device"
            )
        if base.type == "cuda":
            if base.index not in (None, 0):
                raise ConfigError(
                    f"tensor-parallel serving puts rank r on cuda:r; pass device='cuda' (choose the GPUs "
                    f"with CUDA_VISIBLE_DEVICES), not {base}.",
                    field="device",
                )
            if torch.cuda.device_count() < tp:
                raise ConfigError(
                    f"tensor_parallel_size={tp} needs {tp} CUDA devices, but {torch.cuda.device_count()} "
                    "are visible.",
                    field="tensor_parallel_size",
                )
        dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
        logdir = Path(tempfile.mkdtemp(prefix="lmstack-tp-"))
        workers = _Workers(logdir)
        store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))  # fmt: skip
        group = cls(tp, workers, store)
        threads = max(1, torch.get_num_threads() // tp)
        if base.type == "cpu":
            # The ranks share this machine's cores: rank 0's own OpenMP threads would otherwise fight
            # the workers' (each op then waits for a descheduled thread). Restored on close().
            workers.restore_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            for rank in range(1, tp):
                spec = WorkerSpec(
                    path=path, rank=rank, world_size=tp, store_port=store.port,
                    device=str(rank_device(base, rank)), dtype=dtype_name,
                    engine=_json_engine_options(engine_options), parent_pid=os.getpid(), threads=threads,
                    log_level=logging.getLogger("lmstack").getEffectiveLevel(),
                )  # fmt: skip
                env = {**os.environ, SPEC_ENV: spec.to_json(), "OMP_NUM_THREADS": str(threads),
                       "PYTHONPATH": _python_path()}  # fmt: skip
                log = logdir / f"rank{rank}.log"
                with open(log, "wb") as stderr:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "lmstack.infer.engine._tp_worker"], env=env,
                        stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
                    )  # fmt: skip
                workers.procs.append(proc)
                workers.logs.append(log)
            # Rank 0 loads while the workers start and load.
            model = load_pretrained(path, dtype=dtype, device=rank_device(base, 0))
            group._wait_for("loaded", "load the checkpoint")
            # No group existed before this call (checked above), so whatever init leaves is ours to destroy.
            workers.owns_default_group = True
            workers.control = init_group(store, 0, tp, rank_device(base, 0))
            shard_model(model, tp, base.type)
        except BaseException:
            workers.broken = workers.broken or "start-up failed"
            group.close()
            raise
        logger.info("tensor-parallel serving over %d ranks (workers: pids %s)", tp, group.worker_pids)
        return group, model

    def _wait_for(self, key: str, what: str) -> list[str]:
        """Wait until every worker has set ``key``; fail at once when one exits. Returns their values."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        keys = [f"{_KEY}/{key}/{rank}" for rank in range(1, self.size)]
        while not self._store.check(keys):
            dead = self._workers.dead()
            if dead is not None:
                raise InferError(f"a tensor-parallel worker failed to {what}: {dead}")
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"rank {i + 1}: {self._workers.log_tail(i, 1000)}" for i in range(self.size - 1)
                )
                raise InferError(
                    f"the tensor-parallel workers did not {what} within {STARTUP_TIMEOUT_S:.0f} s; "
                    f"their logs end with:\n{tails}"
                )
            time.sleep(0.02)
        return [self._store.get(k).decode() for k in keys]

    def check_ready(self, num_blocks: int) -> None:
        """Wait for every worker's engine, and check that their KV caches have ``num_blocks`` blocks.

        Raises:
            InferError: A worker failed to build its engine, or sized its cache differently.
        """
        try:
            sizes = self._wait_for("ready", "build its engine")
        except BaseException:
            self._workers.broken = "start-up failed"
            self.close()
            raise
        if any(int(s) != num_blocks for s in sizes):
            self._workers.broken = "start-up failed"
            self.close()
            raise InferError(
                f"the tensor-parallel ranks sized their KV caches differently (rank 0: {num_blocks} "
                f"blocks, the others: {sizes}); they must run the same engine options."
            )

    def broadcast_step(self, step: ModelStep) -> None:
        """Send one step's model inputs to every worker (call it right before rank 0's forward).

        Raises:
            InferError: The group is closed, or a worker is gone.
        """
        self.check_alive()
        header, payload = _pack(step)
        control = self._workers.control
        assert control is not None
        with self.guard():
            dist.broadcast(header, src=0, group=control)
            dist.broadcast(payload, src=0, group=control)

    def check_alive(self) -> None:
        """Raise :class:`InferError` when the group is closed, broken, or a worker has exited."""
        workers = self._workers
        if workers.broken is not None:
            raise InferError(f"the tensor-parallel group is broken ({workers.broken}); create a new LLM.")
        if workers.closed:
            raise InferError("the tensor-parallel workers are stopped (the LLM is closed).")
        dead = workers.dead()
        if dead is not None:
            workers.broken = dead
            raise InferError(f"{dead}\nThe engine cannot run without it; create a new LLM.")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a step's broadcast or forward: if it fails, the group is broken for good.

        A rank that stops half-way through a forward leaves the others waiting in a collective that
        the next step's broadcast would be matched against, so no step may follow. A failure (a
        collective whose peer died, or any error on rank 0) becomes :class:`InferError` naming the
        dead worker when there is one; an interrupt propagates as it is.
        """
        workers = self._workers
        try:
            yield
        except BaseException as exc:
            dead = workers.dead()
            if isinstance(exc, RuntimeError):  # a peer that died mid-collective needs a moment to be reaped
                deadline = time.monotonic() + 2
                while dead is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    dead = workers.dead()
            workers.broken = dead or f"a step failed on rank 0: {type(exc).__name__}: {exc}"
            if not isinstance(exc, Exception):
                raise
            raise InferError(
                f"a tensor-parallel step failed: {type(exc).__name__}: {exc}\n"
                f"{dead or 'Every worker is still running.'}\nThe engine cannot go on; create a new LLM."
            ) from exc

    def close(self) -> None:
        """Stop the workers and leave the process group; idempotent."""
        self._finalizer()


def _python_path() -> str:
    """PYTHONPATH for a worker: wherever this process found the lmstack packages, then the inherited one."""
    import lmstack

    roots = [str(Path(p).parent) for p in lmstack.__path__]
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*dict.fromkeys(roots), *([inherited] if inherited else [])])


def _check_unsupported(path: str, engine_options: dict[str, Any]) -> None:
    """Refuse what tensor-parallel serving cannot run yet, before any process starts."""
    if engine_options.get("kernels") == "triton":
        raise ConfigError(
            "kernels='triton' is not supported with tensor_parallel_size > 1 yet; use kernels='torch' "
            "(or 'auto', which picks torch under tensor parallelism).",
            field="kernels",
        )
    from lmstack.infer.quant import is_quantized_checkpoint  # lazy: quant pulls in its kernels

    if is_quantized_checkpoint(path):
        raise ConfigError(
            f"{path} is a weight-quantized checkpoint; tensor_parallel_size > 1 shards plain linear "
            "layers only. Serve it with tensor_parallel_size=1, or serve the unquantized checkpoint.",
            field="tensor_parallel_size",
        )
