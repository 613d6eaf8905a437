"""torchrun driver: the preference and LoRA recipes under several ``parallel:`` layouts in one process group.

argv: model dir, pairs.jsonl, kto.jsonl, chats.jsonl, output root, JSON list of cases. A case is
``{"name", "method", "parallel", "batch_size"}`` with method ``dpo``, ``kto``, ``orpo``, ``simpo``,
``rm`` (a reward model), ``lora`` (adapters on chats) or ``dpo_lora`` (DPO on adapters, the base with
adapters off as the reference); ``run_case`` with ``parallel=None`` in one process is the reference.
"""

import json
import sys
from pathlib import Path

from lmstack.train import DataConfig, ParallelConfig
from lmstack.train._dist import barrier, init_distributed
from lmstack.train._loop import OptimConfig, RunConfig
from lmstack.train.recipes import (
    DPOConfig,
    DPOSettings,
    KTOConfig,
    LoRAConfig,
    LoRASettings,
    ORPOConfig,
    RewardConfig,
    SimPOConfig,
    dpo,
    kto,
    lora,
    orpo,
    rm,
    simpo,
)

RECIPES = {
    "dpo": (DPOConfig, dpo), "kto": (KTOConfig, kto), "orpo": (ORPOConfig, orpo),
    "simpo": (SimPOConfig, simpo), "lora": (LoRAConfig, lora), "dpo_lora": (DPOConfig, dpo),
    "rm": (RewardConfig, rm),
}  # fmt: skip
# No dropout: each rank would draw its own masks. The reward model learns these pairs within 4 steps at
# 3e-3 (loss 2e-5), after which Adam's normalised steps amplify rounding in near-zero gradients: 1e-3.
ADAPTERS = LoRASettings(r=4, alpha=8, dropout=0.0)


def run_case(model, pairs, unpaired, chats, out, method, parallel, batch_size):
    cls, recipe = RECIPES[method]
    out = Path(out)
    path, kind = {"kto": (unpaired, "kto"), "lora": (chats, "messages")}.get(method, (pairs, "preference"))
    data = DataConfig(paths=[str(path)], format=kind, max_length=128, cache_dir=str(out / "cache"))
    extra = {}
    if method == "lora":
        extra = {"lora": ADAPTERS, "merge": True}
    elif method == "dpo_lora":
        extra = {
            "adapter": "lora",
            "lora": ADAPTERS,
            "merge": True,
            "dpo": DPOSettings(reference="adapter_off"),
        }
    cfg = cls(
        model=str(model), data=data,
        optim=OptimConfig(lr=1e-3 if method == "rm" else 3e-3, warmup_steps=0, decay="constant",
                          weight_decay=0.0, grad_clip=1.0),
        run=RunConfig(output_dir=str(out), max_steps=4, batch_size=batch_size, grad_accum=2, save_every=2,
                      device="cpu", tensorboard=False, measure_activations=False, log_every=1),
        parallel=ParallelConfig(**parallel) if parallel is not None else ParallelConfig(), **extra,
    )  # fmt: skip
    return recipe(cfg)


if __name__ == "__main__":
    model, pairs, unpaired, chats, root = *sys.argv[1:5], Path(sys.argv[5])
    info = init_distributed("cpu")
    for case in json.loads(sys.argv[6]):
        out = root / case["name"]
        result = run_case(
            model, pairs, unpaired, chats, out, case["method"], case["parallel"], case["batch_size"]
        )
        if info.is_main:
            (out / "result.json").write_text(
                json.dumps({"mode": result.data_parallel, "world": result.world_size})
            )
        barrier()
