"""Per-rank cases of test_parallel_sequence.py: run under torchrun (gloo, CPU), one launch for all cases.

Reads ``cases.pt`` from the directory in argv[1] (written by the test), runs every case on the
sequence-parallel group of its degree (``ParallelDims(sp=...)``: with sp smaller than the world the
other ranks form further sp groups, data-parallel replicas running the same case), and saves this
rank's local results to ``rank{R}.pt``. The test compares them with the single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmstack.core import CausalLM, ModelConfig
from lmstack.core.parallel._mesh import ParallelDims, ParallelMesh
from lmstack.core.parallel._ring import RingAttention
from lmstack.core.parallel._sequence import UlyssesAttention, gather_sequence, shard_sequence


def backend(case: dict[str, Any], pm: ParallelMesh) -> Any:
    if case["backend"] == "ulysses":
        return UlyssesAttention(case["cu"], pm["sp"], layout=case["layout"])
    return RingAttention(case["cu"], pm["sp"], layout=case["layout"], block_size=case["block_size"])


def attention_case(case: dict[str, Any], pm: ParallelMesh) -> dict[str, Any]:
    sp, rank = pm.size("sp"), pm.local_rank("sp")
    local = [
        shard_sequence(case[name], rank, sp, layout=case["layout"]).clone().requires_grad_(name != "dout")
        for name in ("q", "k", "v", "dout")
    ]
    q, k, v, dout = local
    out = backend(case, pm).attend(0, q, k, v, scale=case["scale"], window=case["window"])
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), (q, k, v))
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


def model_case(case: dict[str, Any], pm: ParallelMesh) -> dict[str, Any]:
    sp, rank = pm.size("sp"), pm.local_rank("sp")
    model = CausalLM(ModelConfig(**case["config"]))
    model.load_state_dict(case["state"])
    model.enable_activation_checkpointing(case["checkpointing"])
    ids, pos, targets = (
        shard_sequence(case[name], rank, sp, layout=case["layout"])
        for name in ("ids", "positions", "targets")
    )
    logits = model(ids, pos, backend(case, pm))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    loss.backward()
    group = pm["sp"].get_group()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grads[name] = g
    return {"loss": total, "grads": grads}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    cases = torch.load(out_dir / "cases.pt", weights_only=False)
    meshes = {sp: ParallelDims(sp=sp).build_mesh("cpu") for sp in sorted({c["sp"] for c in cases})}
    results = []
    for case in cases:
        pm = meshes[case["sp"]]
        run = attention_case if case["kind"] == "attention" else model_case
        results.append(run(case, pm))
    coords = {sp: (pm.local_rank("dp"), pm.local_rank("sp")) for sp, pm in meshes.items()}
    full = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    gathered = {
        (sp, layout): torch.equal(
            gather_sequence(
                shard_sequence(full, pm.local_rank("sp"), sp, layout=layout), pm["sp"], layout=layout
            ),
            full,
        )
        for sp, pm in meshes.items()
        for layout in ("contiguous", "zigzag")
    }
    saved = {"coords": coords, "results": results, "gathered": gathered}
    torch.save(saved, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
