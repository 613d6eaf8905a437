"""The pretrain -> sft chain writes Hugging Face directories that transformers loads as they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lmstack.core import Tokenizer, load_pretrained
from lmstack.train import DataConfig, OptimConfig, RunConfig, TrainResult
from lmstack.train.recipes import ArchConfig, PretrainConfig, SFTConfig, TokenizerConfig, pretrain, sft

transformers = pytest.importorskip("transformers", reason="the transformers comparison needs transformers")


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, chats: Callable[..., list[dict[str, Any]]]
) -> tuple[TrainResult, TrainResult]:
    root = tmp_path_factory.mktemp("chain")
    records = chats(120, seed=3)
    docs = [{"text": " ".join(m["content"] for m in c["messages"])} for c in records[:60]]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in records))
    common: dict[str, Any] = {"batch_size": 2, "save_every": 0, "device": "cpu", "tensorboard": False}
    pre = pretrain(
        PretrainConfig(
            arch=ArchConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
            tokenizer=TokenizerConfig(vocab_size=400),
            # Text documents and chats in one run, as the default model is pretrained.
            data=DataConfig(
                paths=[str(root / "docs.jsonl"), str(root / "chats.jsonl")],
                format="auto",
                train_on="all",
                max_length=96,
                on_overflow="split",
            ),
            optim=OptimConfig(lr=3e-3, warmup_steps=2),
            run=RunConfig(output_dir=str(root / "pre"), max_steps=12, **common),
        )
    )
    tuned = sft(
        SFTConfig(
            model=str(pre.model_dir),
            data=DataConfig(paths=[str(root / "chats.jsonl")], format="messages", max_length=96),
            optim=OptimConfig(lr=2e-3, warmup_steps=2, weight_decay=0.0),
            run=RunConfig(output_dir=str(root / "sft"), max_steps=8, **common),
        )
    )
    return pre, tuned


def test_both_stages_learn(chain: tuple[TrainResult, TrainResult]) -> None:
    for result in chain:
        assert all(torch.isfinite(torch.tensor(result.losses)))
        assert result.losses[-1] < result.losses[0], result.losses


@pytest.mark.parametrize("stage", [0, 1], ids=["pretrain", "sft"])
def test_transformers_loads_the_final_model_with_the_same_logits_and_tokens(
    chain: tuple[TrainResult, TrainResult], stage: int
) -> None:
    path = chain[stage].model_dir
    ours = load_pretrained(path, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the river quill?"},
        {"role": "assistant", "content": "In zorbia."},
    ]
    text = tokenizer.apply_chat_template(conversation)
    assert isinstance(text, str)
    # transformers renders the saved chat template to the same text and tokenizes it the same.
    assert their_tokenizer.apply_chat_template(conversation, tokenize=False) == text
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids]))
    # fp32 on CPU, same weights and the same math up to summation order.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # A trained model, not a fresh one: its greedy next tokens are not all one token.
    assert len(set(expected[0].argmax(-1).tolist())) > 1


def test_the_chat_model_stops_at_its_end_of_turn(chain: tuple[TrainResult, TrainResult]) -> None:
    config = json.loads((chain[1].model_dir / "config.json").read_text())
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    end_of_turn = Tokenizer.from_pretrained(chain[1].model_dir).token_to_id("<|im_end|>")
    assert end_of_turn is not None and end_of_turn in eos, eos
