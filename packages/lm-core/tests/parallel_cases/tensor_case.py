"""torchrun case: every tensor-parallel (and FSDP2) case of one world size; rank 0 saves what it saw.

``python -m torch.distributed.run --nproc_per_node N tensor_case.py OUT_DIR`` runs the cases of
``tensor_common.CASES_<N>``: each builds the mesh of its dims, shards the case's model, runs the
packed batch (each data-parallel rank its own rows) and saves the loss, every gradient made whole,
and after an AdamW step the loss and the parameters, to ``OUT_DIR/<case>.pt``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import tensor_common as tc
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from lmstack.core import ConfigError
from lmstack.core.parallel import ParallelDims
from lmstack.core.parallel._fsdp import apply_fsdp
from lmstack.core.parallel._tensor import apply_tensor_parallel, tp_cross_entropy


def whole(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class RecordingAttention:
    """The packed backend, noting what shapes each attention call receives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[int, ...]] = []
        self.rows_calls = 0

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        self.seen.append((*q.shape, k.shape[2]))
        return self.inner.attend(layer_idx, q, k, v, **kw)

    def attend_rows(self, *args: Any, **kw: Any) -> Tensor:
        self.rows_calls += 1
        return self.inner.attend_rows(*args, **kw)

    def supports_rows(self) -> bool:
        return self.inner.supports_rows()


def run(case: tc.Case) -> dict[str, Any]:
    pm = ParallelDims(**{"dp_shard": 1, **dict(case.dims)}).build_mesh("cpu")
    model = tc.make_model(case.model)
    model.enable_activation_checkpointing(case.checkpointing)
    out: dict[str, Any] = {}
    if pm.enabled("tp"):
        apply_tensor_parallel(
            model, pm["tp"], sequence_parallel=case.sequence_parallel, loss_parallel=case.loss_parallel
        )
        out["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    if pm.dp_size > 1:
        assert pm.mesh is not None
        apply_fsdp(model, pm.mesh["dp_replicate", "dp_shard_sp"] if case.fsdp_hsdp else pm["dp_shard_sp"])
    # Each data-parallel rank reads its own rows; FSDP averages gradients over them, hence * dp_size.
    per = len(tc.ROWS) // pm.dp_size
    batch = tc.make_batch(range(pm.dp_rank * per, (pm.dp_rank + 1) * per))
    n = tc.loss_tokens()
    dp_group = pm["dp"].get_group() if pm.dp_size > 1 else None

    def loss_of(attn: Any) -> tuple[Tensor, Tensor, Tensor]:
        idx = batch.sparse_indices() if case.indices else None
        logits = model(batch.input_ids, batch.positions, attn, logits_indices=idx)
        targets = batch.targets.reshape(-1)[idx] if idx is not None else batch.targets
        summed = tp_cross_entropy(logits, targets, reduction="sum", ignore_index=tc.IGNORE)
        part = summed / n
        total = part.detach().clone()
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
        return part * pm.dp_size, total, logits

    attn = RecordingAttention(batch.attn())
    scaled, total, logits = loss_of(attn)
    scaled.backward()
    out["loss"] = total
    out["seen"] = attn.seen
    out["rows_calls"] = attn.rows_calls
    out["logits_is_dtensor"] = isinstance(logits, DTensor)
    if pm.dp_size == 1:
        out["logits"] = whole(logits.detach())
        # The other reductions agree with the plain loss on the gathered logits.
        full = out["logits"]
        targets = batch.targets.reshape(-1)[batch.sparse_indices()] if case.indices else batch.targets
        for reduction in ("none", "mean"):
            got = tp_cross_entropy(logits.detach(), targets, reduction=reduction, ignore_index=tc.IGNORE)
            want = torch.nn.functional.cross_entropy(
                full.reshape(-1, 97), targets.reshape(-1), reduction=reduction, ignore_index=tc.IGNORE
            ).reshape(got.shape)
            out[f"ce_{reduction}"] = (got, want)
    out["grads"] = {k: whole(p.grad) for k, p in model.named_parameters() if p.grad is not None}
    if case.step:
        # max_norm far above the norm: clipping only measures (the loop clips before stepping).
        out["grad_norm"] = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9))
        tc.optimizer(model).step()
        with torch.no_grad():
            out["loss2"] = loss_of(batch.attn())[1]
        out["params2"] = {k: whole(p.detach()) for k, p in model.named_parameters()}
    return out


def errors() -> dict[str, str]:
    """What a tensor-parallel model refuses: rows that tp does not divide, a fused head."""
    pm = ParallelDims(dp_shard=1, tp=dist.get_world_size()).build_mesh("cpu")
    model = apply_tensor_parallel(tc.make_model("llama"), pm["tp"])
    messages = {}
    ids = torch.zeros(2, 35, dtype=torch.long)
    try:
        model(ids)
    except ConfigError as e:
        messages["odd_rows"] = str(e)
    try:
        model(torch.zeros(2, 36, dtype=torch.long), head=lambda h, lm: h.sum())
    except ConfigError as e:
        messages["head"] = str(e)
    try:
        apply_tensor_parallel(model, pm["tp"])
    except ConfigError as e:
        messages["twice"] = str(e)
    assert pm.mesh is not None
    for what, fn in (("tp_mesh_2d", apply_tensor_parallel), ("fsdp_mesh_5d", apply_fsdp)):
        try:
            fn(tc.make_model("llama"), pm.mesh)
        except ConfigError as e:
            messages[what] = str(e)
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cases = {2: tc.CASES_2, 4: tc.CASES_4}[world]
    for case in cases:
        try:
            result = run(case)
        except Exception:
            # Every rank fails the same way here; say which case on stderr, then stop the job.
            print(f"case {case.name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            raise
        if dist.get_rank() == 0:
            torch.save(result, out / f"{case.name}.pt")
    if world == 2:
        result_err = errors()
        if dist.get_rank() == 0:
            torch.save(result_err, out / "errors.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
