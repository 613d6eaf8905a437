"""Paged attention over a block-scattered KV cache gives transformers' logits.

A tiny random transformers model (Llama, or Mistral for a sliding window) is saved and loaded into
lmstack's model; every sequence then runs through :class:`PagedAttention` in steps that mix prefill
chunks, single-token decodes and idle sequences, its KV blocks deliberately out of order, and the
logits of every position are compared with transformers' eager forward over the whole sequence.
Cases cover GQA ratios 1, 2, 4 and 8, block sizes 1, 3, 4 and 16, and odd prompt lengths that cross
block boundaries.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmstack.core import CausalLM, load_pretrained
from lmstack.infer.engine._paged_attention import KVCache, PagedAttention

Tensor = torch.Tensor

# Odd lengths: shorter than a block, ending mid-block, and spanning several blocks.
LENGTHS = [1, 7, 17, 33]
# fp32 throughout. transformers' eager attention (matmul, softmax, matmul) and SDPA over gathered
# blocks sum in different orders; that rounding (~1e-7 relative per op) grows through 2 layers to at
# most ~2e-5 on logits of magnitude up to ~9 in these cases. 1e-4 absolute leaves 5x headroom over
# that and is far below what a wrong key, position, mask, window or GQA head mapping changes (of the
# order of the logits themselves: dropping the sliding window moves them by ~7).
ATOL = 1e-4

# (GQA ratio, attention heads, kv heads, hidden size)
SHAPES = [(1, 4, 4, 32), (2, 4, 2, 64), (4, 8, 2, 64), (8, 8, 1, 128)]


def _hf_model(tmp_path: Path, heads: int, kv_heads: int, hidden: int, window: int | None = None):
    import transformers

    common = {
        "vocab_size": 97,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,  # logits well away from uniform, so a wrong attention shows
    }
    torch.manual_seed(heads * 100 + kv_heads)
    if window is None:
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(**common, sliding_window=window)
        model = transformers.MistralForCausalLM(config)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    return model


def _step_plan(lengths: list[int], rng: random.Random) -> list[list[int]]:
    """Tokens each sequence runs per step: prefill chunks, then one-token decodes, with idle steps."""
    done = [0] * len(lengths)
    plan = []
    while done != lengths:
        step = []
        for i, n in enumerate(lengths):
            left = n - done[i]
            if not left or rng.random() < 0.2:
                step.append(0)
            elif done[i] < n // 2:  # the first half as prefill chunks, the rest token by token
                step.append(min(left, rng.randint(2, 9)))
            else:
                step.append(1)
        if any(step):
            plan.append(step)
            done = [d + k for d, k in zip(done, step, strict=True)]
    return plan


def _paged_logits(
    model: CausalLM, seqs: list[list[int]], block_size: int, window: int | None
) -> list[Tensor]:
    rng = random.Random(block_size)
    lengths = [len(s) for s in seqs]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 5
    cache = KVCache(model.config, num_blocks, block_size, torch.float32, torch.device("cpu"))
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks deliberately out of order
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    done = [0] * len(seqs)
    got: list[list[Tensor]] = [[] for _ in seqs]
    for plan in _step_plan(lengths, rng):
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
    return [torch.cat(chunks) for chunks in got]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("ratio", "heads", "kv_heads", "hidden"), SHAPES, ids=[f"gqa{s[0]}" for s in SHAPES])
def test_paged_steps_equal_transformers(
    tmp_path: Path, ratio: int, heads: int, kv_heads: int, hidden: int, block_size: int
) -> None:
    assert heads // kv_heads == ratio
    hf = _hf_model(tmp_path, heads, kv_heads, hidden)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(ratio * 31 + block_size)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in LENGTHS]
    got = _paged_logits(ours, seqs, block_size, None)
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        assert expected.abs().max() > 1.0  # not near-uniform: a wrong attention would show
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [3, 5])
def test_sliding_window_equals_transformers_mistral(tmp_path: Path, block_size: int) -> None:
    window = 6
    hf = _hf_model(tmp_path, 4, 2, 64, window=window)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {ours.config.window_of(i) for i in range(2)} == {window}
    gen = torch.Generator().manual_seed(block_size)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in LENGTHS]
    got = _paged_logits(ours, seqs, block_size, window)
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
