"""Scoring many continuations of one context in one sample (the context computed once).

Every pair's log-likelihood must equal a plain full forward over ``context + continuation`` (dense
causal attention, no packing), whatever the grouping: pairs alone, groups that share a context, groups
split by the token budget, and sliding-window layers whose window is shorter than the context.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmstack.core import CausalLM, DenseAttention, ModelConfig, Tokenizer
from lmstack.infer import LLM, SamplingParams


def _reference(model: CausalLM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], DenseAttention())[0, len(ctx) - 1 : -1].double()
    target = torch.tensor(cont)
    logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return logprob, bool((logits.argmax(-1) == target).all())


def _pairs(vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Three contexts with 1-5 continuations each (one of a single token), and unshared pairs, shuffled."""
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))]

    pairs = []
    for n in (1, 4, 5):
        ctx = ids(5, 30)
        pairs += [(ctx, [rng.randrange(3, vocab)] if i == 0 else ids(2, 7)) for i in range(n)]
    pairs += [(ids(1, 20), ids(1, 6)) for _ in range(4)]
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize("max_batch_tokens", [4096, 32])  # one forward; a group split in two
def test_shared_contexts_score_as_full_forwards(model_dir: Path, max_batch_tokens: int) -> None:
    llm = LLM(model_dir)
    pairs = _pairs(llm.engine.vocab_size, seed=3)
    together = llm.loglikelihood(pairs, max_batch_tokens=max_batch_tokens)
    for pair, (logprob, greedy) in zip(pairs, together, strict=True):
        want, want_greedy = _reference(llm.engine.model, *pair)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
        ((alone, alone_greedy),) = llm.loglikelihood([pair])
        assert logprob == pytest.approx(alone, abs=1e-5) and greedy == alone_greedy


def test_a_greedy_continuation_of_a_shared_context(model_dir: Path) -> None:
    llm = LLM(model_dir)
    ctx = llm.tokenizer.encode("the quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    greedy = llm.generate([ctx], params, use_tqdm=False)[0].outputs[0].token_ids
    other = [t + 1 if t + 1 < llm.engine.vocab_size else t - 1 for t in greedy]
    scores = llm.loglikelihood([(ctx, list(greedy)), (ctx, other), (ctx, list(greedy))])
    assert scores[0][1] is True and scores[1][1] is False
    assert scores[0][0] > scores[1][0]
    assert scores[2] == scores[0]  # a duplicate pair is scored once: the same value, not a rounding away


def test_sliding_window_shorter_than_the_shared_context(model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    torch.manual_seed(1)
    config = ModelConfig(
        model_type="mistral", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    llm = LLM(model, tokenizer)
    pairs = _pairs(tokenizer.vocab_size, seed=5)
    for pair, (logprob, greedy) in zip(pairs, llm.loglikelihood(pairs), strict=True):
        want, want_greedy = _reference(model, *pair)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
