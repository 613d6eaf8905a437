"""Paged attention over a block-scattered KV cache equals dense attention over whole sequences."""

from __future__ import annotations

import random

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig
from lmstack.infer.engine._paged_attention import KVCache, PagedAttention


def _model(**overrides: object) -> CausalLM:
    torch.manual_seed(0)
    raw = {
        "model_type": "llama", "vocab_size": 89, "hidden_size": 48, "intermediate_size": 72,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
    }  # fmt: skip
    raw.update(overrides)
    return CausalLM(ModelConfig.from_dict(raw)).eval()


@pytest.mark.parametrize(("block_size", "window"), [(4, None), (3, None), (5, 6)])
def test_chunked_steps_over_scattered_blocks_equal_dense(block_size: int, window: int | None) -> None:
    overrides = {"model_type": "mistral", "sliding_window": window} if window else {}
    model = _model(**overrides)
    rng = random.Random(0)
    lengths = [11, 5, 1, 17]
    seqs = [torch.randint(0, 89, (n,)).tolist() for n in lengths]
    cache = KVCache(
        model.config, num_blocks=40, block_size=block_size, dtype=torch.float32, device=torch.device("cpu")
    )
    free = list(range(40))
    rng.shuffle(free)  # blocks deliberately out of order
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    with torch.no_grad():
        expected = [model(torch.tensor([s]))[0] for s in seqs]
    done = [0] * len(seqs)
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    step_plan = [[4, 5, 1, 3], [7, 0, 0, 6], [0, 0, 0, 1], [0, 0, 0, 7]]  # chunks, decodes, idle sequences
    for plan in step_plan:
        active = [i for i, n in enumerate(plan) if n]
        ids, pos, slots = [], [], []
        for i in active:
            for p in range(done[i], done[i] + plan[i]):
                ids.append(seqs[i][p])
                pos.append(p)
                slots.append(tables[i][p // block_size] * block_size + p % block_size)
        attn = PagedAttention(
            cache,
            torch.tensor(slots),
            [plan[i] for i in active],
            [done[i] + plan[i] for i in active],
            [tables[i] for i in active],
            window_sizes=[window],
        )
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.tensor([pos]), attn)[0]
        start = 0
        for i in active:
            got[i].append(logits[start : start + plan[i]])
            start += plan[i]
            done[i] += plan[i]
    assert done == lengths
    for i in range(len(seqs)):
        assert (torch.cat(got[i]) - expected[i]).abs().max() <= 1e-5
