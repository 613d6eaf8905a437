"""Chat-template tokenization with a real BPE tokenizer: the loss lands exactly on the assistant replies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmstack.core import Tokenizer
from lmstack.train import DataConfig, DataError, SampleTokenizer, tokenize_dataset
from lmstack.train.data import ChatTemplateError, Sample
from lmstack.train.data._formats import content_text
from lmstack.train.data._tokenize import TokenizedSample


def _runs(tokenizer: Tokenizer, sample: TokenizedSample) -> list[str]:
    """The trained tokens, decoded run by run (one run per contiguous stretch of loss)."""
    runs: list[list[int]] = []
    previous = False
    for token, trained in zip(sample.input_ids.tolist(), sample.loss_mask.tolist(), strict=True):
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "12+30=42."},
    {"role": "user", "content": "And the capital of Zorbia, é 你好?"},
    {"role": "assistant", "content": "The capital of Zorbia is Quill 你好!\n"},
    {"role": "tool", "content": "weather: rain"},
    {"role": "assistant", "content": "It will rain."},
]


def test_loss_on_assistant_replies_and_their_end_of_turn(tokenizer: Tokenizer) -> None:
    sample = SampleTokenizer(tokenizer)([Sample(messages=MULTI_TURN)])[0]
    text = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert isinstance(text, str)
    assert sample.input_ids.tolist() == tokenizer.encode(text, add_special_tokens=False)
    replies = [m["content"] + "<|im_end|>" for m in MULTI_TURN if m["role"] == "assistant"]
    assert _runs(tokenizer, sample) == replies
    assert not sample.loss_mask[0] and sample.labels[0] == -100
    assert (sample.labels[sample.loss_mask] == sample.input_ids[sample.loss_mask]).all()


def test_train_on_all(tokenizer: Tokenizer) -> None:
    sample = SampleTokenizer(tokenizer, train_on="all")([Sample(messages=MULTI_TURN)])[0]
    assert not sample.loss_mask[0] and sample.loss_mask[1:].all()


def test_second_template_is_handled_the_same_way(tokenizer: Tokenizer, llama3_template: str) -> None:
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "  Hello!  "},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye 你好."},
    ]
    sample = SampleTokenizer(tokenizer, chat_template=llama3_template)([Sample(messages=chat)])[0]
    text = tokenizer.apply_chat_template(chat, chat_template=llama3_template)
    assert isinstance(text, str) and text.startswith("<s><|start_header_id|>system")
    assert sample.input_ids.tolist() == tokenizer.encode(text, add_special_tokens=False)
    # The template trims the content; the trained tokens are the reply as rendered plus <|eot_id|>.
    assert _runs(tokenizer, sample) == ["Hello!<|eot_id|>", "Goodbye 你好.<|eot_id|>"]


def test_template_without_generation_prompt_locates_the_reply(tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
    chat = MULTI_TURN[1:3]
    sample = SampleTokenizer(tokenizer, chat_template=template)([Sample(messages=chat)])[0]
    assert _runs(tokenizer, sample) == ["12+30=42.</s>"]


def test_content_parts_give_the_same_reply_text_everywhere(tokenizer: Tokenizer) -> None:
    """A reply of content parts: only string ``text`` counts (images, a null text carry none)."""
    parts = [
        {"type": "text", "text": "12+30"},
        {"type": "image_url", "image_url": {"url": "x.png"}},
        {"type": "text", "text": None},
        "=42.",
    ]
    assert content_text(parts) == "12+30=42."
    # A template that ignores add_generation_prompt: the reply is found by that text.
    template = (
        "{% for m in messages %}[{{ m['role'] }}]"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p is string %}{{ p }}"
        "{% elif p['text'] is string %}{{ p['text'] }}{% endif %}{% endfor %}"
        "{% endif %}</s>\n{% endfor %}"
    )
    chat = [MULTI_TURN[1], {"role": "assistant", "content": parts}]
    sample = SampleTokenizer(tokenizer, chat_template=template)([Sample(messages=chat)])[0]
    assert _runs(tokenizer, sample) == ["12+30=42.</s>"]
    # And a reply whose parts hold no text is empty, by the same rule the formats check it with.
    empty = [{"type": "text", "text": None}]
    assert content_text(empty) == ""


def test_template_that_is_not_prefix_stable_is_refused(tokenizer: Tokenizer) -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = SampleTokenizer(tokenizer, chat_template=template)
    with pytest.raises(
        ChatTemplateError, match=r"chat\.jsonl:7: the chat template is not prefix-stable.*message 2"
    ):
        tok([Sample(messages=MULTI_TURN, source="chat.jsonl", line=7)])
    # train_on=all does not need prefixes.
    assert tok.train_on == "assistant"
    SampleTokenizer(tokenizer, chat_template=template, train_on="all")([Sample(messages=MULTI_TURN)])


def test_text_documents_get_bos_and_eos(tokenizer: Tokenizer) -> None:
    doc = "The river Quill flows 你好."
    with_eos, without = (
        SampleTokenizer(tokenizer, add_eos=flag)([Sample(text=doc)])[0] for flag in (True, False)
    )
    body = tokenizer.encode(doc, add_special_tokens=False)
    assert with_eos.input_ids.tolist() == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert without.input_ids.tolist() == [tokenizer.bos_token_id, *body]
    assert not with_eos.loss_mask[0] and with_eos.loss_mask[1:].all() and not with_eos.is_chat


def test_template_refusal_is_a_data_error(
    tokenizer: Tokenizer, write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_jsonl("r.jsonl", [{"messages": MULTI_TURN[:3]}, {"messages": MULTI_TURN}])
    config: dict[str, Any] = {"paths": [str(path)], "chat_template": template}
    with pytest.raises(
        DataError, match=r"r\.jsonl:2: the chat template refused the conversation.*no tools here"
    ):
        tokenize_dataset(DataConfig(**config), tokenizer)
    data = tokenize_dataset(DataConfig(**config, on_malformed="skip"), tokenizer)
    assert len(data) == 1 and data.stats.skipped_malformed == 1


def test_batched_tokenization_matches_one_by_one(
    tokenizer: Tokenizer, chats: Callable[..., list[dict[str, Any]]]
) -> None:
    samples = [Sample(messages=r["messages"]) for r in chats(20, seed=3)] + [Sample(text="a b c")]
    tok = SampleTokenizer(tokenizer)
    batched = tok(samples)
    for sample, got in zip(samples, batched, strict=True):
        alone = tok([sample])[0]
        np.testing.assert_array_equal(got.input_ids, alone.input_ids)
        np.testing.assert_array_equal(got.loss_mask, alone.loss_mask)
        if sample.messages:
            replies = [m["content"] + "<|im_end|>" for m in sample.messages if m["role"] == "assistant"]
            assert _runs(tokenizer, got) == replies
