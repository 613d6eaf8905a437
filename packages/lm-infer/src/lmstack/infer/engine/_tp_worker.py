"""A tensor-parallel worker: ``python -m lmstack.infer.engine._tp_worker`` (started by rank 0).

It reads its :class:`~lmstack.infer.engine._tensor_parallel.WorkerSpec` from the environment, loads
the checkpoint, joins rank 0's process group, shards the model, builds the same engine as rank 0 (so
its KV cache has the same blocks, for its own kv heads), and then runs the forward of every step rank
0 broadcasts until the stop header comes. It schedules and samples nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from lmstack.core import Tokenizer, load_pretrained
from lmstack.infer.engine._engine import EngineConfig, LLMEngine
from lmstack.infer.engine._tensor_parallel import (
    _KEY,
    SPEC_ENV,
    STARTUP_TIMEOUT_S,
    WorkerSpec,
    init_group,
    receive_step,
    shard_model,
)

logger = logging.getLogger("lmstack.infer.engine.tp_worker")


def _watch_parent(parent_pid: int) -> None:
    """Exit when rank 0's process is gone (this process is then re-parented)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def run(spec: WorkerSpec) -> None:
    """Serve as rank ``spec.rank`` until rank 0 sends the stop header."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))  # fmt: skip
    model = load_pretrained(spec.path, dtype=spec.dtype, device=device, progress=False)
    store.set(f"{_KEY}/loaded/{spec.rank}", "1")
    control = init_group(store, spec.rank, spec.world_size, device)
    shard_model(model, spec.world_size, device.type)
    engine = LLMEngine(model, Tokenizer.from_pretrained(spec.path), EngineConfig(**spec.engine))
    store.set(f"{_KEY}/ready/{spec.rank}", str(engine.num_blocks))
    steps = 0
    with torch.inference_mode():
        while (step := receive_step(control, device)) is not None:
            engine._execute(step)
            steps += 1
    logger.info("rank %d: stopping after %d steps", spec.rank, steps)
    dist.destroy_process_group()
    logger.info("rank %d: left the process group", spec.rank)


def main() -> int:
    """Entry point: run the worker described by the environment; the exit status says how it went."""
    spec = WorkerSpec.from_json(os.environ[SPEC_ENV])
    logging.basicConfig(
        level=spec.log_level, stream=sys.stderr,
        format=f"%(asctime)s tp-rank{spec.rank} %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    # Ctrl-C in the server's terminal is for rank 0, which drains and then stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True).start()
    try:
        run(spec)
    except Exception:
        logger.exception("tensor-parallel worker rank %d failed", spec.rank)
        if dist.is_initialized():  # leave the group, or the process aborts on exit
            try:
                dist.destroy_process_group()
            except Exception:
                logger.debug("destroying the process group failed", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Nothing is left to clean up once the group is left, and the interpreter's own teardown of
    # torch takes seconds: leave at once, so closing an LLM does not wait for it.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
