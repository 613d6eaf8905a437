"""What the pipeline test and its torchrun cases share: the tiny model, the packed batches, the optimizer.

Imported by ``pipeline_cases.py`` (each rank) and ``test_parallel_pipeline.py`` (the single-process
reference), so both sides build bit-identical weights and batches.
"""

from __future__ import annotations

from typing import Any

import torch

from lmstack.core import CausalLM, ModelConfig

LAYERS = 7  # odd: balanced splits are uneven (4+3, 2+2+2+1)
IGNORE = -100


def config(**overrides: Any) -> ModelConfig:
    """A tiny llama-family config: hidden 48, GQA 6/2 heads, odd vocab 97 and feed-forward 68."""
    raw: dict[str, Any] = {
        "model_type": "llama", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 68,
        "num_hidden_layers": LAYERS, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    raw.update(overrides)
    return ModelConfig(**raw)


def build_model(seed: int = 0, **overrides: Any) -> CausalLM:
    """The model every rank and the reference build: random weights, norms and all."""
    torch.manual_seed(seed)
    model = CausalLM(config(**overrides))
    model.reset_parameters(std=0.08)  # larger than the default so logits are far from uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not ones: a norm applied on the wrong stage would show
                p.normal_(mean=1.0, std=0.2)
    return model


def packed_batch(rows: int, tokens: int, seed: int, masked: float = 0.2) -> dict[str, torch.Tensor]:
    """A packed batch: many short samples of odd lengths, one long one, a row with no loss at all.

    Row 1 is mostly one long sample; row 2 carries no loss token (a microbatch of it has no loss
    rows); elsewhere a share ``masked`` of the labels is masked out, as an SFT batch's prompts are.
    With few loss tokens (at most half of a microbatch's) the last decoder layer runs on the loss
    rows alone, as ``CausalLM.forward`` does with ``logits_indices``.
    """
    g = torch.Generator().manual_seed(seed)
    positions = []
    for r in range(rows):
        lengths = [tokens - 3, 3] if r == 1 else []
        while sum(lengths) < tokens:
            lengths.append(min(int(torch.randint(1, 8, (1,), generator=g)), tokens - sum(lengths)))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    pos = torch.stack(positions)
    ids = torch.randint(0, 97, (rows, tokens), generator=g)
    labels = ids.clone()
    labels[pos == 0] = IGNORE  # a sample's first token is no target of the sample before it
    labels[torch.rand(rows, tokens, generator=g) < masked] = IGNORE
    labels[2] = IGNORE
    return {"input_ids": ids, "positions": pos, "labels": labels}


BATCH_1: dict[str, Any] = {"rows": 4, "tokens": 37, "seed": 11}  # most tokens carry loss
# A new length (the schedule is rebuilt for it) and few loss tokens (the rows-only last layer).
BATCH_2: dict[str, Any] = {"rows": 4, "tokens": 29, "seed": 12, "masked": 0.75}


def optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with weight decay, large enough a step that the next loss moves.

    ``eps=1e-5``, not the default 1e-8: Adam's first step moves every weight by about ``lr * g / (|g| +
    eps)``, so a gradient element near ``eps`` would turn its fp32 rounding (up to ~2e-9 absolute
    here, from another summation order) into a visible change of the weight; this eps bounds that to
    ``lr * 2e-9 / eps = 2e-6``.
    """
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-5)
