"""Per-request long context: dynamic NTK RoPE per sequence, max_model_len checks, chunked long prompts.

Every greedy output is checked against transformers running each request alone through
``generate`` (a fresh model per request: transformers' dynamic RoPE keeps the frequencies of the
longest sequence it has seen, so a reused model would not be "alone").
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmstack.core import (
    CausalLM,
    ConfigError,
    ModelConfig,
    RopeScaling,
    Tokenizer,
    save_pretrained,
    train_bpe_tokenizer,
)
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.engine import LLMEngine

MAX_POS = 256
FACTOR = 4.0
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
         "quietly", "hex", "jovial", "zebras"]  # fmt: skip


def _tokenizer() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "." for _ in range(300)]
    return train_bpe_tokenizer(iter(texts), vocab_size=300, min_frequency=2)


def _config(vocab_size: int, rope_scaling: RopeScaling | None) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POS, rope_scaling=rope_scaling,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ntk_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with dynamic NTK RoPE (trained context 256, factor 4), saved in the HF layout."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = CausalLM(_config(tokenizer.vocab_size, RopeScaling("dynamic", FACTOR)))
    # Large weights: clear greedy margins, so float rounding cannot flip a choice but a wrong RoPE base does.
    model.reset_parameters(std=0.25)
    out = tmp_path_factory.mktemp("models") / "tiny-ntk"
    save_pretrained(model, out, tokenizer=tokenizer)
    return out


def _hf_alone(model_dir: Path, prompt: list[int], max_new: int) -> list[int]:
    """Greedy tokens of transformers' LlamaForCausalLM for one request, on a freshly loaded model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.model.rotary_emb.rope_type == "dynamic"  # the reference really uses dynamic NTK
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until every request is done; the token ids of each, by request id."""
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    return outputs


def test_short_request_is_unaffected_by_a_long_one_in_the_same_step(ntk_model_dir: Path) -> None:
    llm = LLM(ntk_model_dir, max_model_len=1024, max_num_batched_tokens=1024)
    vocab = llm.engine.vocab_size
    short, long = _prompt(20, vocab, seed=1), _prompt(600, vocab, seed=2)
    alone = llm.generate([short], _greedy(12))[0].outputs[0].token_ids

    engine = llm.engine
    engine.add_request(short, _greedy(12), request_id="short")
    engine.add_request(long, _greedy(8), request_id="long")
    engine.step()
    # Both prefills ran in that one step (and both decode together from now on).
    assert engine._requests["short"].seqs[0].num_computed_tokens == len(short)
    assert engine._requests["long"].seqs[0].num_computed_tokens == len(long)
    outputs = _drain(engine)
    assert outputs["short"] == alone
    assert alone == _hf_alone(ntk_model_dir, short, 12)
    assert outputs["long"] == _hf_alone(ntk_model_dir, long, 8)
    assert engine.num_free_blocks == engine.num_blocks


def test_chunked_prefill_of_a_prompt_near_the_context_limit(ntk_model_dir: Path) -> None:
    # 900 tokens in chunks of at most 128 (with a short request's tokens in the same steps): every chunk
    # must use the RoPE base of the whole 900-token prompt, as transformers' single prefill call does.
    llm = LLM(ntk_model_dir, max_model_len=1024, max_num_batched_tokens=128, block_size=16)
    vocab = llm.engine.vocab_size
    long, short = _prompt(900, vocab, seed=3), _prompt(30, vocab, seed=4)
    # A second long prompt sharing the first 640 tokens: its K/V for them differ (its own length sets
    # the base), so they must not come from the first prompt's cached blocks.
    sibling = long[:640] + _prompt(60, vocab, seed=5)
    engine = llm.engine
    engine.add_request(short, _greedy(10), request_id="short")
    engine.add_request(long, _greedy(20), request_id="long")
    engine.step()
    assert 0 < engine._requests["long"].seqs[0].num_computed_tokens <= 128  # the prompt is chunked
    outputs = _drain(engine)
    assert outputs["long"] == _hf_alone(ntk_model_dir, long, 20)
    assert outputs["short"] == _hf_alone(ntk_model_dir, short, 10)
    again = llm.generate([sibling], _greedy(10))[0]
    assert again.outputs[0].token_ids == _hf_alone(ntk_model_dir, sibling, 10)
    assert again.num_cached_tokens == 0  # salted by its own length: nothing of the first is reused
    # The same 900-token prompt again: the same length, so its cached blocks are reused, and rightly.
    assert engine.block_manager.enable_prefix_caching
    repeat = llm.generate([long], _greedy(20))[0]
    assert repeat.num_cached_tokens >= 640
    assert repeat.outputs[0].token_ids == outputs["long"]
    assert llm.engine.num_free_blocks == llm.engine.num_blocks


def _llm(rope_scaling: RopeScaling | None, max_model_len: int) -> LLM:
    tokenizer = _tokenizer()
    model = CausalLM(_config(tokenizer.vocab_size, rope_scaling))
    model.reset_parameters()
    return LLM(model, tokenizer, max_model_len=max_model_len, num_kv_blocks=8)


def test_max_model_len_beyond_the_trained_context_needs_a_scaling_that_supports_it() -> None:
    with pytest.raises(ConfigError) as info:
        _llm(None, 1024)
    assert "1024" in str(info.value) and str(MAX_POS) in str(info.value)
    assert info.value.field == "max_model_len"
    assert _llm(RopeScaling("dynamic", FACTOR), 4096).max_model_len == 4096
    # Linear interpolation and YaRN cover max_position_embeddings x factor, no more.
    assert _llm(RopeScaling("linear", 2.0), 512).max_model_len == 512
    with pytest.raises(ConfigError, match="512"):
        _llm(RopeScaling("linear", 2.0), 513)
    assert _llm(RopeScaling("yarn", 4.0), 1024).max_model_len == 1024
    with pytest.raises(ConfigError):
        _llm(RopeScaling("yarn", 4.0), 1025)
    # Llama 3's max_position_embeddings already counts the extension (131072 = 16 x 8192 for 3.1).
    llama3 = RopeScaling("llama3", 8.0, original_max_position_embeddings=16,
                         low_freq_factor=1.0, high_freq_factor=4.0)  # fmt: skip
    assert _llm(llama3, MAX_POS).max_model_len == MAX_POS
    with pytest.raises(ConfigError):
        _llm(llama3, MAX_POS + 1)
    assert _llm(None, MAX_POS).max_model_len == MAX_POS


def _hf_loglikelihood(model_dir: Path, ctx: list[int], cont: list[int]) -> float:
    """transformers' summed log-prob of ``cont`` after ``ctx``: one forward over ctx + cont[:-1] alone."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(ctx) - 1 :].double()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihood_uses_each_pairs_own_dynamic_ntk_length(ntk_model_dir: Path) -> None:
    # Two choices sharing a context past the trained length, and a short pair scored in the same forward:
    # each must get the RoPE base of its own length (before, the packed row's longest position set it).
    llm = LLM(ntk_model_dir, max_model_len=1024)
    vocab = llm.engine.vocab_size
    long_ctx = _prompt(400, vocab, seed=7)
    pairs = [(long_ctx, _prompt(5, vocab, seed=8)), (long_ctx, _prompt(3, vocab, seed=9)),
             (_prompt(20, vocab, seed=10), _prompt(4, vocab, seed=11))]  # fmt: skip
    got = llm.loglikelihood(pairs)
    for (ctx, cont), (logprob, _) in zip(pairs, got, strict=True):
        assert logprob == pytest.approx(_hf_loglikelihood(ntk_model_dir, ctx, cont), abs=1e-3), len(ctx)
