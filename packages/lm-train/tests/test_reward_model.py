"""Reward models: transformers compatibility of the saved directory, loading, and the scorer.

References: ``transformers.AutoModelForSequenceClassification`` on the saved directory (its own
implementation of the body and of last-non-pad pooling), and a manual forward of ids rendered
independently with ``Tokenizer.apply_chat_template``. Tolerance 1e-5 in float32: the same weights
run through two implementations (or two attention paths) differ only by summation order, about 1e-7
relative on rewards of order one; a bug (wrong token, missing bias, wrong pad) moves them by 1e-2 or more.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer, save_pretrained, train_bpe_tokenizer
from lmstack.train._reward import RewardModel, RewardScorer, load_reward_model, save_reward_model
from lmstack.train.data._errors import TrainError

ATOL = 1e-5

PROMPTS: list[Any] = [
    "What is the capital of zorbia?",
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hello world, how is the weather in paris?"},
    ],
    [
        {"role": "user", "content": "One plus two?"},
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "And two plus two?"},
    ],
    "Thank you!",
    "Where is the river named quill?",
]
COMPLETIONS = [
    "The capital of zorbia is paris.",
    "Rain.",
    "Four, the answer is four and the number is four.",
    "Sure, here is your result.",
    "In the mountains known as the teeth, where the river quill begins.",
]


def _reward_model(vocab_size: int, model_type: str = "llama", seed: int = 0, **extra: Any) -> RewardModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )
    causal = CausalLM(config, dtype=torch.float32)
    causal.reset_parameters(std=0.1)  # larger than the default 0.02, so that sequences score apart
    with torch.no_grad():  # non-trivial norms and biases, so that a weight read wrongly shows
        for name, p in causal.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return RewardModel(causal).eval()


def _rendered(tokenizer: Tokenizer, template: str | None = None) -> list[list[int]]:
    """Prompt + completion ids, rendered independently of PreferenceTokenizer."""
    out = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], chat_template=template
        )
        assert isinstance(text, str)
        out.append(tokenizer.encode(text.rstrip(), add_special_tokens=False))
    return out


def _right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids, mask


def _ours_one_by_one(model: RewardModel, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])


def _hf(path: Path) -> Any:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
        )
    return hf.eval(), info


@pytest.mark.parametrize(
    ("model_type", "architecture", "written_type"),
    [
        ("llama", "LlamaForSequenceClassification", "llama"),
        ("qwen2", "Qwen2ForSequenceClassification", "qwen2"),
        ("mistral", "MistralForSequenceClassification", "mistral"),
        ("internlm3", "LlamaForSequenceClassification", "llama"),
    ],
)
def test_transformers_loads_and_scores_the_same(
    tmp_path: Path, tokenizer: Tokenizer, model_type: str, architecture: str, written_type: str
) -> None:
    extra = {"qkv_bias": True} if model_type == "internlm3" else {}
    model = _reward_model(len(tokenizer), model_type, **extra)
    out = save_reward_model(model, tmp_path / "rm", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["model_type"] == written_type
    assert config["num_labels"] == 1 and config["pad_token_id"] == tokenizer.pad_token_id
    assert not (out / "generation_config.json").exists()

    hf, info = _hf(out)
    assert type(hf).__name__ == architecture
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])

    seqs = _rendered(tokenizer)
    assert len({len(s) for s in seqs}) == len(seqs)  # really different lengths, so padding matters
    ids, mask = _right_padded(seqs, hf.config.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    ours = _ours_one_by_one(model, seqs)
    assert ours.std() > 0.05  # sequences score apart: reading the wrong token would show
    assert (theirs - ours).abs().max() <= ATOL


def test_pad_that_ends_completions_is_replaced(tmp_path: Path) -> None:
    # A tokenizer that pads with its end-of-turn token, as many chat checkpoints do.
    texts = [f"{w} is a word of the world number {i}." for i, w in enumerate("abcdefghij" * 8)]
    tok = train_bpe_tokenizer(iter(texts), vocab_size=300, pad_token="<|im_end|>")
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None
    assert tok.pad_token_id == im_end
    model = _reward_model(len(tok))
    out = save_reward_model(model, tmp_path / "rm", tokenizer=tok)
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    assert pad is not None and pad != im_end
    assert Tokenizer.from_pretrained(out).pad_token_id == pad  # the saved tokenizer pads with it too

    seqs = [[*s[:-k], im_end] for s, k in zip(_rendered(tok)[:3], (1, 2, 3), strict=True)]
    assert all(s[-1] == im_end for s in seqs)
    hf, _ = _hf(out)
    ours = _ours_one_by_one(model, seqs)
    with torch.no_grad():
        ids, mask = _right_padded(seqs, pad)
        assert (hf(input_ids=ids, attention_mask=mask).logits[:, 0] - ours).abs().max() <= ATOL
        # The pad the tokenizer came with would have read every reward one token early.
        ids, mask = _right_padded(seqs, im_end)
        hf.config.pad_token_id = im_end
        assert (hf(input_ids=ids, attention_mask=mask).logits[:, 0] - ours).abs().min() > 1e-3


def test_load_round_trip_and_transformers_directory(tmp_path: Path, tokenizer: Tokenizer) -> None:
    model = _reward_model(len(tokenizer), "qwen2", tie_word_embeddings=True)
    out = save_reward_model(model, tmp_path / "rm", tokenizer=tokenizer, max_shard_size="40KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded by core's writer
    loaded = load_reward_model(out)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert "lm_head.weight" not in loaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    seqs = _rendered(tokenizer)
    diff = (_ours_one_by_one(loaded, seqs) - _ours_one_by_one(model, seqs)).abs().max().item()
    assert diff <= 1e-6  # identical weights; only memory alignment (BLAS kernel choice) differs
    assert not any(k in loaded.config.extra for k in ("num_labels", "id2label"))

    # A directory transformers itself wrote (same layout) loads too, with its scores.
    hf, _ = _hf(out)
    hf.save_pretrained(tmp_path / "hf")
    again = load_reward_model(tmp_path / "hf")
    with torch.no_grad():
        ids = torch.tensor([seqs[0]])
        assert (again(ids)[0, -1] - hf(input_ids=ids).logits[0, 0]).abs() <= ATOL


def test_forward_head_and_checkpointing(tiny_model: Any) -> None:
    causal = tiny_model(97)
    model = RewardModel(causal)
    names = set(model.state_dict())
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert {n for n in names if n != "score.weight"} == {
        n for n in causal.state_dict() if n != "lm_head.weight"
    }
    assert model.model is causal.model  # the body is shared, not copied
    assert model.num_parameters() == causal.num_parameters() - 97 * 32 + 32

    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    assert full.shape == (3, 11) and full.dtype == torch.float32
    picked = torch.tensor([4, 11 + 10, 32])
    assert torch.allclose(model(ids, indices=picked), full.reshape(-1)[picked], atol=1e-6)

    # Activation checkpointing changes memory, not gradients.
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_activation_checkpointing(enabled)
        model(ids, indices=picked).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

    # The head's init keeps rewards of unit scale: std 1/sqrt(hidden + 1).
    big = ModelConfig(model_type="llama", vocab_size=8, hidden_size=4096, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=32)  # fmt: skip
    head = RewardModel(CausalLM(big, device="meta"))
    head.score.to_empty(device="cpu")
    torch.manual_seed(0)
    head.reset_score()
    assert abs(head.score.weight.std().item() * (4096 + 1) ** 0.5 - 1) < 0.05


@pytest.mark.parametrize("template", [None, "llama3"])
def test_scorer_matches_manual_forward_and_batching(
    tmp_path: Path, tokenizer: Tokenizer, llama3_template: str, template: str | None
) -> None:
    chat_template = llama3_template if template == "llama3" else None
    model = _reward_model(len(tokenizer), seed=1)
    save_reward_model(model, tmp_path / "rm", tokenizer=tokenizer)
    scorer = RewardScorer.from_pretrained(tmp_path / "rm", chat_template=chat_template, device="cpu")

    seqs = _rendered(tokenizer, chat_template)
    assert [list(s) for s in scorer.encode(PROMPTS, COMPLETIONS)] == seqs
    end = tokenizer.token_to_id("<|eot_id|>" if template else "<|im_end|>")
    assert all(s[-1] == end for s in seqs)  # the reward is read at the end-of-turn token
    manual = _ours_one_by_one(model, seqs).tolist()

    packed = scorer.score(PROMPTS, COMPLETIONS, batch_size=16)
    single = scorer.score(PROMPTS, COMPLETIONS, batch_size=1)
    padded = scorer.score(PROMPTS, COMPLETIONS, batch_size=3, packed=False)
    for got in (packed, single, padded):
        assert len(got) == len(PROMPTS)
        assert max(abs(a - b) for a, b in zip(got, manual, strict=True)) <= ATOL
    assert len({round(r, 4) for r in packed}) == len(packed)  # distinct rewards: no mix-up goes unseen


def test_bad_input(tmp_path: Path, tokenizer: Tokenizer, tiny_model: Any) -> None:
    scorer = RewardScorer(_reward_model(len(tokenizer)), tokenizer)
    with pytest.raises(TrainError, match="2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["c"])
    with pytest.raises(TrainError, match="nothing to score"):
        scorer.score([], [])
    with pytest.raises(TrainError, match="lists"):
        scorer.score("a prompt", "a completion")  # type: ignore[arg-type]
    with pytest.raises(TrainError, match="batch_size"):
        scorer.score(["a"], ["b"], batch_size=0)
    with pytest.raises(TrainError, match="ends with an assistant turn"):
        scorer.score([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], ["c"])
    with pytest.raises(TrainError, match="empty"):
        scorer.score(["  "], ["c"])
    with pytest.raises(TrainError, match="does not exist"):
        RewardScorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(TrainError, match=r"no config\.json"):
        load_reward_model(tmp_path)
    save_pretrained(tiny_model(len(tokenizer)), tmp_path / "causal")
    with pytest.raises(TrainError, match=r"no score\.weight"):
        load_reward_model(tmp_path / "causal")
    with pytest.raises(TrainError, match="no tokenizer"):
        RewardScorer.from_pretrained(tmp_path / "causal")


def test_from_causal_lm_and_save_without_tokenizer(tmp_path: Path, tiny_model: Any) -> None:
    causal = tiny_model(97)
    save_pretrained(causal, tmp_path / "causal")
    model = RewardModel.from_causal_lm(tmp_path / "causal").eval()
    for name, value in causal.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], value), name

    # Without a tokenizer the end-of-turn token is unknown and the config's pad (None) stays: transformers
    # then scores one sequence per call, at its last token.
    out = save_reward_model(model, tmp_path / "rm")
    assert json.loads((out / "config.json").read_text())["pad_token_id"] is None
    hf, info = _hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits[0, 0] - model(ids)[0, -1]).abs() <= ATOL
