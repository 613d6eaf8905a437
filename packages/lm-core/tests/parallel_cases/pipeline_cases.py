"""torchrun case: every pipeline-parallel case of one world size; each rank saves what it saw.

``python -m torch.distributed.run --nproc_per_node N pipeline_cases.py OUT_DIR`` runs the cases of
``CASES[N]``: each builds the model, cuts it with ``pipeline_split`` over the pp mesh, runs one step
(loss, gradients of the parameters this rank owns), an AdamW step over those parameters, and a second
step on a batch of another length; rank ``r`` saves it all to ``OUT_DIR/<case>.<r>.pt``. The 2-rank
launch also records the errors the API raises for what it refuses (``OUT_DIR/errors.<r>.pt``).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import pipeline_common as pc
import torch
import torch.distributed as dist

from lmstack.core import LMStackError
from lmstack.core.parallel import ParallelDims
from lmstack.core.parallel._pipeline import Pipeline, build_pipeline_schedule, pipeline_split, pipeline_step

# name: (pp, stages_per_rank, schedule, n_microbatches, layers_per_stage, activation checkpointing)
CASES: dict[int, dict[str, tuple[int, int, str, int, list[int] | None, bool]]] = {
    2: {
        "pp2_1f1b": (2, 1, "1f1b", 2, None, False),  # two rows a microbatch
        "pp2_interleaved": (2, 2, "interleaved", 4, None, True),  # one row each, one with no loss row
        "pp1": (1, 1, "1f1b", 2, None, False),  # one stage holds the whole model (dp_shard=2, unused)
    },
    4: {
        "pp4_gpipe": (4, 1, "gpipe", 2, [1, 3, 2, 1], False),
        "pp4_1f1b": (4, 1, "1f1b", 4, None, False),
    },
}


def step(pipe: Pipeline, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return pipeline_step(pipe, batch["input_ids"], batch["positions"], batch["labels"])


def run(
    pp: int, per_rank: int, schedule: str, n_micro: int, split: list[int] | None, ckpt: bool
) -> dict[str, Any]:
    pm = ParallelDims(pp=pp, dp_shard=-1).build_mesh("cpu")
    model = pc.build_model()
    stages = pipeline_split(model, pm["pp"], stages_per_rank=per_rank, layers_per_stage=split)
    del model  # the stages hold what this rank needs
    for stage in stages:
        stage.enable_activation_checkpointing(ckpt)
    pipe = build_pipeline_schedule(stages, n_microbatches=n_micro, schedule=schedule)  # type: ignore[arg-type]
    params = {n: p for s in stages for n, p in s.named_parameters()}
    opt = pc.optimizer(list(params.values()))
    out: dict[str, Any] = {
        "stages": [s.stage_index for s in stages],
        "layers": [list(s.layer_ids) for s in stages],
    }
    out["loss1"] = step(pipe, pc.packed_batch(**pc.BATCH_1))
    out["grads1"] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["params1"] = {n: p.detach().clone() for n, p in params.items()}
    out["loss2"] = step(pipe, pc.packed_batch(**pc.BATCH_2))
    out["grads2"] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    out["names"] = sorted(params)
    return out


def errors() -> dict[str, str]:
    """What the API refuses, as (type name: message); no collective runs here."""
    found: dict[str, str] = {}
    pm = ParallelDims(pp=2, dp_shard=1).build_mesh("cpu")

    def note(key: str, fn: Any) -> None:
        try:
            fn()
        except LMStackError as e:
            found[key] = f"{type(e).__name__}: {e}"
        else:
            found[key] = "no error"

    note("tied", lambda: pipeline_split(pc.build_model(tie_word_embeddings=True), pm["pp"]))
    note("split", lambda: pipeline_split(pc.build_model(), pm["pp"], layers_per_stage=[3, 3]))
    note("too_many", lambda: pipeline_split(pc.build_model(), pm["pp"], stages_per_rank=4))
    stages = pipeline_split(pc.build_model(), pm["pp"], stages_per_rank=2)
    note("gpipe_multi", lambda: build_pipeline_schedule(stages, n_microbatches=2, schedule="gpipe"))
    one = pipeline_split(pc.build_model(), pm["pp"])
    note("few_micro", lambda: build_pipeline_schedule(one, n_microbatches=1, schedule="1f1b"))
    pipe = build_pipeline_schedule(one, n_microbatches=4)
    batch = pc.packed_batch(rows=6, tokens=9, seed=3)
    note("rows", lambda: step(pipe, batch))
    return found


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for name, spec in CASES[world].items():
            torch.save(run(*spec), out / f"{name}.{rank}.pt")
            dist.barrier()
        if world == 2:
            torch.save(errors(), out / f"errors.{rank}.pt")
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # a rank stuck in a collective would otherwise hang the launch
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
