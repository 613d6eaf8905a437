"""torchrun driver: the preference recipes under several ``parallel:`` layouts in one process group.

argv: model dir, pairs.jsonl, kto.jsonl, output root, JSON list of cases. A case is ``{"name", "method",
"parallel", "batch_size"}``; ``run_case`` with ``parallel=None`` in one process is the reference.
"""

import json
import sys
from pathlib import Path

from lmstack.train import DataConfig, ParallelConfig
from lmstack.train._dist import barrier, init_distributed
from lmstack.train._loop import OptimConfig, RunConfig
from lmstack.train.recipes import DPOConfig, KTOConfig, ORPOConfig, SimPOConfig, dpo, kto, orpo, simpo

RECIPES = {
    "dpo": (DPOConfig, dpo),
    "kto": (KTOConfig, kto),
    "orpo": (ORPOConfig, orpo),
    "simpo": (SimPOConfig, simpo),
}


def run_case(model, pairs, unpaired, out, method, parallel, batch_size):
    cls, recipe = RECIPES[method]
    out = Path(out)
    data = DataConfig(
        paths=[str(unpaired if method == "kto" else pairs)],
        format="kto" if method == "kto" else "preference",
        max_length=128,
        cache_dir=str(out / "cache"),
    )
    cfg = cls(
        model=str(model), data=data,
        optim=OptimConfig(lr=3e-3, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0),
        run=RunConfig(output_dir=str(out), max_steps=4, batch_size=batch_size, grad_accum=2, save_every=2,
                      device="cpu", tensorboard=False, measure_activations=False, log_every=1),
        parallel=ParallelConfig(**parallel) if parallel is not None else ParallelConfig(),
    )  # fmt: skip
    return recipe(cfg)


if __name__ == "__main__":
    model, pairs, unpaired, root = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    info = init_distributed("cpu")
    for case in json.loads(sys.argv[5]):
        out = root / case["name"]
        result = run_case(model, pairs, unpaired, out, case["method"], case["parallel"], case["batch_size"])
        if info.is_main:
            (out / "result.json").write_text(
                json.dumps({"mode": result.data_parallel, "world": result.world_size})
            )
        barrier()
