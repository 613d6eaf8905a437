"""What the tensor-parallel cases share with their test: models, the packed batch, the step, the reference.

The torchrun script (``tensor_case.py``) runs each case on the ranks; the test runs :func:`reference`
for the same case in one process, with none of lmstack.core.parallel, and compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.core import CausalLM, ModelConfig, PackedAttention

# Rows of one packed batch: sample lengths (odd, many short, one long), each row 36 tokens (tp=4 divides).
ROWS: tuple[tuple[int, ...], ...] = ((1, 3, 5, 7, 9, 11), (36,), (13, 23), (2, 17, 17))
T = 36
IGNORE = -100
LR = 1e-2

CONFIGS: dict[str, dict[str, Any]] = {
    # 8 query / 4 key-value heads and a feed-forward of 88 split over tp=2 and tp=4; vocab 97 does not.
    "llama": {"model_type": "llama", "num_hidden_layers": 3},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 2},  # q, k and v with bias
    "tied": {"model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": True},
}


def config(name: str) -> ModelConfig:
    """The tiny config of a case."""
    return ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=88, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=64, **CONFIGS[name],
    )  # fmt: skip


def make_model(name: str, seed: int = 0) -> CausalLM:
    """The case's model, the same on every rank: random init, then random norms and biases too."""
    torch.manual_seed(seed)
    model = CausalLM(config(name))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.normal_(mean=1.0 if "norm" in pname else 0.0, std=0.1)
    return model


@dataclass
class Batch:
    """A packed batch of some rows of :data:`ROWS`."""

    input_ids: Tensor  # [B, T]
    positions: Tensor  # [B, T], restarting at 0 per sample
    cu_seqlens: Tensor  # over the B * T flat tokens
    targets: Tensor  # [B, T], the next token of the sample, IGNORE at a sample's last token

    def attn(self) -> PackedAttention:
        """The packed attention of these rows (the varlen CPU kernel, one call per layer)."""
        return PackedAttention(self.cu_seqlens)

    def sparse_indices(self) -> Tensor:
        """Flat indices of a few loss rows (under half of the tokens: the rows-only last layer runs)."""
        flat = self.targets.reshape(-1)
        rows = torch.nonzero(flat != IGNORE).flatten()
        return rows[::3].contiguous()


def make_batch(rows: range | list[int] | None = None, seed: int = 1) -> Batch:
    """The packed batch of the rows ``rows`` (all by default); ids are the same whichever rows are taken."""
    g = torch.Generator().manual_seed(seed)
    ids_all = torch.randint(0, 97, (len(ROWS), T), generator=g)
    chosen = list(range(len(ROWS))) if rows is None else list(rows)
    positions, targets, lengths = [], [], []
    for r in chosen:
        assert sum(ROWS[r]) == T
        pos = torch.cat([torch.arange(n) for n in ROWS[r]])
        tgt = torch.full((T,), IGNORE)
        start = 0
        for n in ROWS[r]:
            tgt[start : start + n - 1] = ids_all[r, start + 1 : start + n]
            start += n
        positions.append(pos)
        targets.append(tgt)
        lengths.extend(ROWS[r])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])
    return Batch(ids_all[chosen], torch.stack(positions), cu, torch.stack(targets))


def loss_tokens() -> int:
    """Tokens with a target in the whole batch: every loss is the summed token loss over this."""
    return int((make_batch().targets != IGNORE).sum())


@dataclass(frozen=True)
class Case:
    """One parallel configuration and what to check under it."""

    name: str
    model: str = "llama"
    dims: tuple[tuple[str, int], ...] = (("tp", 2),)  # ParallelDims(**dict(dims))
    sequence_parallel: bool = True
    loss_parallel: bool = True
    indices: bool = False  # logits at sparse_indices() only
    checkpointing: bool = False
    step: bool = False  # an AdamW step, then the loss again
    fsdp_hsdp: bool = False  # FSDP over the 2-D (dp_replicate, dp_shard_sp) mesh instead of dp_shard_sp


CASES_2 = [
    Case("tp2_sp", step=True),
    Case("tp2_nosp", sequence_parallel=False),
    Case("tp2_sp_indices", indices=True),
    Case("tp2_nosp_indices", sequence_parallel=False, indices=True),
    Case("tp2_no_loss_parallel", loss_parallel=False),
    Case("tp2_qwen2_checkpointing", model="qwen2", checkpointing=True),
    Case("tp2_tied", model="tied", step=True),
]
CASES_4 = [
    Case("tp4_sp", dims=(("tp", 4),)),
    Case("dp2_tp2", dims=(("dp_shard", 2), ("tp", 2)), step=True),
    Case("dp2_tp2_nosp_tied", model="tied", dims=(("dp_shard", 2), ("tp", 2)), sequence_parallel=False),
    Case("hsdp2x2", dims=(("dp_replicate", 2), ("dp_shard", 2)), fsdp_hsdp=True, step=True),
    Case("hsdp2_tp2", dims=(("dp_replicate", 2), ("dp_shard", 1), ("tp", 2)), fsdp_hsdp=True),
]


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; eps above these tiny gradients' float noise: an update differs by noise * lr / eps at most."""
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-4, weight_decay=0.1)


def reference(case: Case) -> dict[str, Any]:
    """The case on one process: the whole batch, the whole model, ``F.cross_entropy``."""
    model = make_model(case.model)
    model.enable_activation_checkpointing(case.checkpointing)
    batch = make_batch()
    n = loss_tokens()

    def loss_of() -> tuple[Tensor, Tensor]:
        idx = batch.sparse_indices() if case.indices else None
        logits = model(batch.input_ids, batch.positions, batch.attn(), logits_indices=idx)
        targets = batch.targets.reshape(-1)[idx] if idx is not None else batch.targets
        loss = F.cross_entropy(
            logits.reshape(-1, 97), targets.reshape(-1), reduction="sum", ignore_index=IGNORE
        )
        return loss / n, logits

    loss, logits = loss_of()
    loss.backward()
    out: dict[str, Any] = {
        "loss": loss.detach(),
        "logits": logits.detach(),
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    }
    if case.step:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
        opt = optimizer(model)
        opt.step()
        with torch.no_grad():
            out["loss2"] = loss_of()[0]
        out["params2"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out
