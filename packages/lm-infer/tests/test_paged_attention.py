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
    model: CausalLM, seqs: list[list[int]], block_size: int, window: int | None, use_kernel: bool
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
            use_kernel=use_kernel,
        )
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.tensor([pos]), attn)[0]
        start = 0
        for i in active:
            got[i].append(logits[start : start + plan[i]])
            start += plan[i]
            done[i] += plan[i]
    return [torch.cat(chunks) for chunks in got]


# Both ways PagedAttention reads a float32 cache: lmstack-core's CPU kernel, and torch (SDPA).
KERNEL = [True, False]
KERNEL_IDS = ["kernel", "torch"]


@pytest.mark.parametrize("use_kernel", KERNEL, ids=KERNEL_IDS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("ratio", "heads", "kv_heads", "hidden"), SHAPES, ids=[f"gqa{s[0]}" for s in SHAPES])
def test_paged_steps_equal_transformers(
    tmp_path: Path, ratio: int, heads: int, kv_heads: int, hidden: int, block_size: int, use_kernel: bool
) -> None:
    assert heads // kv_heads == ratio
    hf = _hf_model(tmp_path, heads, kv_heads, hidden)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(ratio * 31 + block_size)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in LENGTHS]
    got = _paged_logits(ours, seqs, block_size, None, use_kernel)
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        assert expected.abs().max() > 1.0  # not near-uniform: a wrong attention would show
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_kernel", KERNEL, ids=KERNEL_IDS)
@pytest.mark.parametrize("block_size", [3, 5])
def test_sliding_window_equals_transformers_mistral(
    tmp_path: Path, block_size: int, use_kernel: bool
) -> None:
    window = 6
    hf = _hf_model(tmp_path, 4, 2, 64, window=window)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {ours.config.window_of(i) for i in range(2)} == {window}
    gen = torch.Generator().manual_seed(block_size)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in LENGTHS]
    got = _paged_logits(ours, seqs, block_size, window, use_kernel)
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# PagedAttention alone against a dense reference: SDPA-free attention over the un-paged K/V.
# ---------------------------------------------------------------------------------------------

# fp32: the paged outputs and the float64 reference differ only by fp32 rounding in sums of at most
# ~100 products of O(1) terms (~1e-6); 1e-5 leaves headroom and a wrong key or mask moves outputs by
# O(0.1). bf16: queries, keys and values are bf16 in both, but the output is rounded to bf16 (8
# mantissa bits: up to 0.4% of |out| <= ~3) and CPU kernels may round the probabilities too, so
# 2e-2 absolute; a wrong key still moves outputs by O(0.1) or more.
DENSE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BS = 4
REGION = 8  # blocks per region in the layouts below


def _dense(q: Tensor, keys: Tensor, values: Tensor, window: int | None, scale: float) -> Tensor:
    """Reference: the step's queries (the last ``len(q)`` positions) over the whole un-paged K/V."""
    q64, k64, v64 = q.double(), keys.double(), values.double()
    groups = q.shape[1] // keys.shape[1]
    k64, v64 = k64.repeat_interleave(groups, dim=1), v64.repeat_interleave(groups, dim=1)
    ctx, n = keys.shape[0], q.shape[0]
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)


def _run_step(
    tables: list[list[int]],
    history: list[int],
    query_lens: list[int],
    *,
    dtype: torch.dtype = torch.float32,
    window: int | None = None,
    shared: tuple[int, int, int] | None = None,
    heads: tuple[int, int] = (4, 2),
    num_blocks: int = 6 * REGION,
    use_kernel: bool | None = False,
) -> PagedAttention:
    """Fill the cache with each sequence's history, run one step, compare with :func:`_dense`.

    ``shared = (a, b, n)``: sequence ``b`` shares sequence ``a``'s first ``n`` blocks (same K/V).
    """
    from lmstack.core import ModelConfig

    hq, hkv = heads
    d = 16
    config = ModelConfig(model_type="llama", vocab_size=8, hidden_size=hq * d, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=hq, num_key_value_heads=hkv)  # fmt: skip
    cache = KVCache(config, num_blocks, BS, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(sum(history) + len(tables))
    ctx = [h + n for h, n in zip(history, query_lens, strict=True)]
    full_k = [torch.randn(c, hkv, d, generator=gen).to(dtype) for c in ctx]
    full_v = [torch.randn(c, hkv, d, generator=gen).to(dtype) for c in ctx]
    if shared is not None:
        a, b, n = shared
        assert tables[b][:n] == tables[a][:n]
        full_k[b][: n * BS], full_v[b][: n * BS] = full_k[a][: n * BS], full_v[a][: n * BS]

    def slot(i: int, p: int) -> int:
        return tables[i][p // BS] * BS + p % BS

    for i, h in enumerate(history):
        for p in range(h):
            cache.keys[0, slot(i, p)], cache.values[0, slot(i, p)] = full_k[i][p], full_v[i][p]
    slots = [slot(i, p) for i, h in enumerate(history) for p in range(h, ctx[i])]
    q = torch.randn(1, len(slots), hq, d, generator=gen).to(dtype)
    new_k = torch.cat([full_k[i][h:] for i, h in enumerate(history)])[None]
    new_v = torch.cat([full_v[i][h:] for i, h in enumerate(history)])[None]
    attn = PagedAttention(
        cache, torch.tensor(slots), query_lens, ctx, tables, window_sizes=[window], use_kernel=use_kernel
    )
    scale = d**-0.5
    got = attn.attend(0, q, new_k, new_v, scale=scale, window=window)[0]
    start = 0
    for i, n in enumerate(query_lens):
        expected = _dense(q[0, start : start + n], full_k[i], full_v[i], window, scale)
        torch.testing.assert_close(got[start : start + n].double(), expected, atol=DENSE_TOL[dtype], rtol=0)
        start += n
    return attn


def _region_table(region: int, tokens: int) -> list[int]:
    return list(range(region * REGION, region * REGION + -(-tokens // BS)))


DTYPES = [torch.float32, torch.bfloat16]
# (cache dtype, use_kernel): the kernel reads a float32 cache only.
PATHS = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)]
PATH_IDS = ["float32-kernel", "float32-torch", "bfloat16-torch"]


@pytest.mark.parametrize(("dtype", "use_kernel"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2), (8, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_reads_regions_in_place(dtype: torch.dtype, use_kernel: bool, heads: tuple[int, int]) -> None:
    # Regions 0, 1, 3 and 4: one idle row (region 2) inside the view; odd lengths end mid-block.
    history = [0, 13, 30, 7]
    tables = [_region_table(r, h + 1) for r, h in zip([0, 1, 3, 4], history, strict=True)]
    attn = _run_step(tables, history, [1] * 4, dtype=dtype, heads=heads, use_kernel=use_kernel)
    assert attn.num_zero_copy == 4


@pytest.mark.parametrize(("dtype", "use_kernel"), PATHS, ids=PATH_IDS)
def test_fragmented_tables_are_gathered_or_read_by_the_kernel(dtype: torch.dtype, use_kernel: bool) -> None:
    history = [5, 22, 30]
    rng = random.Random(0)
    free = list(range(6 * REGION))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-(h + 1) // BS))] for h in history]
    assert all(t != list(range(t[0], t[0] + len(t))) for t in tables if len(t) > 1)
    attn = _run_step(tables, history, [1] * 3, dtype=dtype, use_kernel=use_kernel)
    assert attn.num_zero_copy == (3 if use_kernel else 0)  # the kernel follows any table in place


def test_sparse_regions_fall_back_to_gathering() -> None:
    # Rows 0, 1 and 7 of a strided view would be 8 rows for 3 sequences: gathered instead.
    history = [9, 10, 11]
    tables = [_region_table(r, h + 1) for r, h in zip([0, 1, 7], history, strict=True)]
    assert _run_step(tables, history, [1] * 3, num_blocks=8 * REGION).num_zero_copy == 0
    # Regions 0 and 7 alone: the view's row stride is 7 regions, so 2 rows, read in place.
    assert _run_step(tables[::2], history[::2], [1] * 2, num_blocks=8 * REGION).num_zero_copy == 2


@pytest.mark.parametrize(("dtype", "use_kernel"), PATHS, ids=PATH_IDS)
def test_shared_prefix_with_mixed_decode_and_prefill(dtype: torch.dtype, use_kernel: bool) -> None:
    # Sequence 1 shares sequence 0's first 3 blocks (a prefix-cache hit), then owns block 40;
    # sequence 2 prefills a chunk of 5 after 6 cached tokens, sequence 3 a first chunk of 7;
    # sequence 4 decodes on consecutive blocks that start off a region boundary.
    history = [17, 14, 6, 0, 9]
    query_lens = [1, 1, 5, 7, 1]
    tables = [_region_table(0, 18), [0, 1, 2, 40], _region_table(2, 11), _region_table(3, 7), [33, 34, 35]]
    attn = _run_step(tables, history, query_lens, dtype=dtype, shared=(0, 1, 3), use_kernel=use_kernel)
    # torch: sequences 0 and 4; the shared table and the chunks are gathered. The kernel: all five.
    assert attn.num_zero_copy == (5 if use_kernel else 2)


@pytest.mark.parametrize(("dtype", "use_kernel"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_in_place_and_gathered(dtype: torch.dtype, use_kernel: bool, window: int) -> None:
    history = [3, 20, 29, 12, 10]
    query_lens = [1, 1, 1, 1, 6]
    tables = [_region_table(r, h + n) for r, h, n in zip([0, 1, 2, 4, 5], history, query_lens, strict=True)]
    tables[3] = [47, 46, 45, 44]  # fragmented: gathered
    attn = _run_step(tables, history, query_lens, dtype=dtype, window=window, use_kernel=use_kernel)
    assert attn.num_zero_copy == (5 if use_kernel else 3)


def test_a_float32_cpu_cache_takes_the_kernel_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmstack.core.model import cpu_kernels

    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()  # CI builds it: tested, not skipped
    calls: list[int] = []
    real = cpu_kernels.paged_attention

    def spy(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "paged_attention", spy)
    tables = [_region_table(1, 30), [44, 40, 41]]
    attn = _run_step(tables, [29, 5], [1, 4], use_kernel=None)
    assert attn.num_zero_copy == 2 and calls == [1]
    _run_step(tables, [29, 5], [1, 4], dtype=torch.bfloat16, use_kernel=None)
    assert calls == [1]  # a bfloat16 cache keeps SDPA
    with pytest.raises(ValueError, match="float32 cache"):
        _run_step(tables, [29, 5], [1, 4], dtype=torch.bfloat16, use_kernel=True)
