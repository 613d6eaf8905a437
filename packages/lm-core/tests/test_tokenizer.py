"""Tokenizer and chat templates, checked against transformers as an independent reference.

Every tokenizer is built in the test: byte-level BPE trained with ``train_bpe_tokenizer`` on a few
KB of generated text, and SentencePiece models trained with ``SentencePieceTrainer``. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
import transformers
from transformers import AutoTokenizer

from lmstack.core import TokenizerError
from lmstack.core.tokenizer import INTERNLM2_CHAT_TEMPLATE, Tokenizer, train_bpe_tokenizer

transformers.logging.set_verbosity_error()

# --------------------------------------------------------------------------------------------
# corpus and inputs
# --------------------------------------------------------------------------------------------

_WORDS = (  # noqa: SIM905 - a sentence reads better than a list of 70 strings
    "the quick brown fox jumps over a lazy dog while the model learns to tokenize text "
    "def return import class self lambda print yield 0 1 2 42 3.14 {} [] () == != <= -> :: "
    "hello world token tokenizer language model training inference "
    "你好 世界 模型 训练 日本語 テキスト 한국어 café naïve façade über straße Ωμέγα русский "
    "😀 🚀 👍🏽 👨‍👩‍👧 ✓ € £ ¥ — … « »"
).split()


def _corpus(seed: int = 0, lines: int = 160) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sep = rng.choice([" ", " ", " ", "  ", "\t", " \n"])
        out.append(sep.join(words))
    return out


TEXTS = [
    "",
    "hello world",
    "Hello, World! It's 3.14 -> 42.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\nlines\r\n and \n\n blank lines",
    "你好\uff0c世界\uff01模型训练 日本語 한국어",  # fullwidth comma and exclamation mark
    "emoji 😀🚀 family 👨‍👩‍👧 skin 👍🏽 flags 🇫🇷",
    "combining e\u0301 vs é, ﬁ ligature, zero\u200bwidth, nbsp\u00a0here",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
    "unseen: ⟨xylophone⟩ ß Ǆ ᚠ \U0001f9ec",
    "<s>bos inside</s> and <|im_start|>user\nhi<|im_end|>\n",
    "partial <|im_sta and <s >, </s>x<s>",
    " <|im_end|><|im_end|>  <pad><unk>",
]

INTERNLM2_SPECIALS = ("<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A Llama-3-style template: bos, header ids, eot, strftime_now for the default date, trim filter.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# A Qwen2-style ChatML: default system prompt, tools rendered with tojson, tool calls and tool
# results, loop controls, and blocks written without "-" so that trim/lstrip_blocks matter.
QWEN2_TEMPLATE = """{% if tools %}
    {{- '<|im_start|>system\\n' -}}
    {% if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] -}}
    {% else %}
        {{- 'You are Qwen, a helpful assistant.' -}}
    {% endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" -}}
    {% for tool in tools %}
        {{- "\\n" -}}
        {{- tool | tojson -}}
    {% endfor %}
    {{- "\\n</tools>\\nSchema: " + (tools[0] | tojson(indent=2)) + "<|im_end|>\\n" -}}
{% else %}
    {% if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
    {% else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' -}}
    {% endif %}
{% endif %}
{% for message in messages %}
    {% if message.role == "system" and loop.first %}
        {% continue %}
    {% endif %}
    {% if message.role == "assistant" and message.tool_calls is defined %}
        {{- '<|im_start|>assistant' -}}
        {% if message.content %}{{- '\\n' + message.content }}{% endif %}
        {% for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' -}}
            {{- call.function.arguments | tojson -}}
            {{- '}\\n</tool_call>' -}}
        {% endfor %}
        {{- '<|im_end|>\\n' -}}
    {% elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' -}}
    {% else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

RAISING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + '. Only user/assistant/system.') }}"
    "{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville — 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single": [{"role": "user", "content": "Hi there! 你好 😀"}],
    "multi_with_system": [
        {"role": "system", "content": "  You are a terse assistant.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And <|im_start|> inside text?\nTwo lines."},
    ],
    "multi_no_system": [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second"},
        {"role": "user", "content": "Third"},
    ],
}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temp_c": 21, "sky": "clair ☀"}'},
]


# --------------------------------------------------------------------------------------------
# fixtures: three trained flavours (InternLM2-, Llama-3- and Qwen2-like), saved and reloaded
# --------------------------------------------------------------------------------------------


def _train(texts: list[str], **kwargs: Any) -> Tokenizer:
    return train_bpe_tokenizer(iter(texts), 600, min_frequency=2, **kwargs)


@pytest.fixture(scope="module")
def flavours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flavours")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    assert 4_000 < corpus.stat().st_size < 20_000

    internlm2 = train_bpe_tokenizer([corpus], 600)  # from a file, with every default
    llama3 = _train(
        _corpus(1),
        special_tokens=LLAMA3_SPECIALS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=None,
        unk_token=None,
        chat_template=LLAMA3_TEMPLATE,
    )
    qwen2 = _train(
        _corpus(2),
        special_tokens=QWEN2_SPECIALS,
        bos_token=None,  # Qwen2 has no bos token at all
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=QWEN2_TEMPLATE,
    )
    dirs = {}
    for name, tok in (("internlm2", internlm2), ("llama3", llama3), ("qwen2", qwen2)):
        dirs[name] = root / name
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def loaded(flavours: dict[str, Path]) -> dict[str, tuple[Tokenizer, Any]]:
    return {
        name: (Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path))
        for name, path in flavours.items()
    }


def _hf_chat(hf: Any, messages: Any, **kwargs: Any) -> tuple[str, list[int]]:
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return text, list(ids)


def _our_chat(tok: Tokenizer, messages: Any, **kwargs: Any) -> tuple[str, list[int]]:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    assert isinstance(text, str) and isinstance(ids, list)
    return text, ids


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# encode / decode parity with transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["internlm2", "llama3", "qwen2"])
def test_encode_decode_match_transformers(loaded: dict[str, tuple[Tokenizer, Any]], flavour: str) -> None:
    tok, hf = loaded[flavour]
    assert tok.vocab_size == len(hf)
    for text in TEXTS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (flavour, text, add)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    for add in (True, False):
        batch = tok.encode_batch(TEXTS, add_special_tokens=add)
        assert batch == hf(TEXTS, add_special_tokens=add)["input_ids"]
        assert batch == [tok.encode(t, add_special_tokens=add) for t in TEXTS]
    for skip in (False, True):
        assert tok.decode_batch(batch, skip_special_tokens=skip) == hf.batch_decode(
            batch, skip_special_tokens=skip
        )


@pytest.mark.parametrize("flavour", ["internlm2", "llama3", "qwen2"])
def test_special_tokens_match_transformers(loaded: dict[str, tuple[Tokenizer, Any]], flavour: str) -> None:
    tok, hf = loaded[flavour]
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(hf, name), name
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, name) == getattr(hf, name), name
    assert set(hf.all_special_ids) <= set(tok.all_special_ids)
    for token, index in hf.get_vocab().items():
        assert tok.token_to_id(token) == index
        assert tok.id_to_token(index) == token
    assert tok.token_to_id("never-a-token-\u2603\u2603\u2603") is None
    assert tok.id_to_token(tok.vocab_size + 10) is None
    assert tok.id_to_token(-1) is None


def test_trained_tokenizer_layout(
    loaded: dict[str, tuple[Tokenizer, Any]], flavours: dict[str, Path]
) -> None:
    tok, _ = loaded["internlm2"]
    # The special tokens come first, in the order given, and encode adds bos only.
    assert [tok.id_to_token(i) for i in range(len(INTERNLM2_SPECIALS))] == list(INTERNLM2_SPECIALS)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.pad_token_id == 3
    assert tok.all_special_ids == [0, 1, 2, 3, 4, 5]
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("") == [0]
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [4]
    assert 256 + len(INTERNLM2_SPECIALS) < tok.vocab_size <= 600
    assert tok.chat_template == INTERNLM2_CHAT_TEMPLATE
    qwen, _ = loaded["qwen2"]
    assert qwen.bos_token is None and qwen.bos_token_id is None
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)  # no bos, nothing added
    config = json.loads((flavours["internlm2"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == INTERNLM2_CHAT_TEMPLATE
    special_map = json.loads((flavours["internlm2"] / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["bos_token"] == "<s>"
    assert special_map["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_byte_level_round_trip(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["internlm2"]
    trained = _train(_corpus(3))  # in memory, never saved
    for text in [*TEXTS, "".join(chr(c) for c in range(32, 0x2FF)), "\x00\x01\x7f", "a" * 5000]:
        for t in (tok, trained):
            assert t.decode(t.encode(text, add_special_tokens=False)) == text
    # Byte-level BPE never produces the unknown token, whatever the input.
    assert tok.unk_token_id not in tok.encode("\U0010fffd\U0001d11e\u0378", add_special_tokens=False)


def test_trained_and_reloaded_are_identical(flavours: dict[str, Path], tmp_path: Path) -> None:
    tok = _train(_corpus(4))
    tok.save_pretrained(tmp_path / "t")
    mine, hf = Tokenizer.from_pretrained(tmp_path / "t"), AutoTokenizer.from_pretrained(tmp_path / "t")
    for text in TEXTS:
        assert tok.encode(text) == mine.encode(text) == hf.encode(text)
    assert tok.vocab_size == mine.vocab_size == len(hf)
    # Saving what was loaded gives the same files back.
    mine.save_pretrained(tmp_path / "again")
    assert _snapshot(tmp_path / "t") == _snapshot(tmp_path / "again")


def test_tokenizer_is_picklable(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["llama3"]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[5]) == tok.encode(TEXTS[5])
    assert clone.apply_chat_template(
        CONVERSATIONS["single"], date_string="1 Jan 2025"
    ) == tok.apply_chat_template(CONVERSATIONS["single"], date_string="1 Jan 2025")


def test_config_declared_tokens_are_added_like_transformers(
    flavours: dict[str, Path], tmp_path: Path
) -> None:
    # Named and model-specific special tokens that the tokenizer.json lacks, an extra special token,
    # an added_tokens_decoder entry, and padding/truncation left in tokenizer.json: transformers adds
    # the tokens to the backend and never pads a plain encode; so must we.
    path = tmp_path / "declared"
    shutil.copytree(flavours["internlm2"], path)
    raw = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    raw["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 3,
        "pad_type_id": 0,
        "pad_token": "<pad>",
    }
    raw["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["mask_token"] = "<mask>"
    config["image_token"] = "<image>"
    config["additional_special_tokens"] = [*config["additional_special_tokens"], "<|tool|>"]
    config["added_tokens_decoder"]["9999"] = {
        "content": "<extra_0>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(hf)
    text = "a <mask> b <image> c <|tool|> d <extra_0> e " + TEXTS[6]
    for add in (True, False):
        assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)
    ids = tok.encode(text)
    assert len(ids) > 4  # neither padded to 64 nor truncated to 4
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.special_tokens_map["image_token"] == "<image>"
    assert tok.token_to_id("<mask>") in tok.all_special_ids


def test_add_bos_token_in_config_does_not_override_tokenizer_json(
    flavours: dict[str, Path], tmp_path: Path
) -> None:
    # transformers ignores add_bos_token/add_eos_token when a tokenizer.json is present.
    path = tmp_path / "flags"
    shutil.copytree(flavours["internlm2"], path)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(add_bos_token=False, add_eos_token=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tok.encode("hello") == hf.encode("hello")
    assert tok.encode("hello")[0] == tok.bos_token_id


# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["internlm2", "llama3", "qwen2"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(
    loaded: dict[str, tuple[Tokenizer, Any]], flavour: str, conversation: str, add_generation_prompt: bool
) -> None:
    tok, hf = loaded[flavour]
    messages = CONVERSATIONS[conversation]
    extra = {"date_string": "26 Jul 2024"} if flavour == "llama3" else {}
    ours = _our_chat(tok, messages, add_generation_prompt=add_generation_prompt, **extra)
    assert ours == _hf_chat(hf, messages, add_generation_prompt=add_generation_prompt, **extra)
    text = ours[0]
    assert (
        text.endswith(
            {
                "internlm2": "<|im_start|>assistant\n",
                "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                "qwen2": "<|im_start|>assistant\n",
            }[flavour]
        )
        == add_generation_prompt
    )
    if flavour == "internlm2":
        # The built-in ChatML, spelled out.
        expected = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert text == expected + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        assert ours[1][0] == tok.bos_token_id and ours[1].count(tok.bos_token_id) == 1
    if flavour == "llama3":
        assert text.startswith(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul"
        )
        assert ours[1][0] == tok.bos_token_id and ours[1].count(tok.token_to_id("<|eot_id|>") or -1) >= 2
    if flavour == "qwen2":
        assert ("You are Qwen" in text) == (conversation != "multi_with_system")


def test_llama3_template_uses_strftime_now(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, hf = loaded["llama3"]
    messages = CONVERSATIONS["single"]
    # Both render today's date; retry once in case the two calls straddle midnight.
    for _ in range(2):
        if _our_chat(tok, messages) == _hf_chat(hf, messages):
            break
    else:
        pytest.fail("strftime_now rendering differs from transformers")
    assert "Today Date: " in tok.apply_chat_template(messages)  # type: ignore[operator]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tools_branch_matches_transformers(
    loaded: dict[str, tuple[Tokenizer, Any]], add_generation_prompt: bool
) -> None:
    tok, hf = loaded["qwen2"]
    kwargs = {"tools": TOOLS, "add_generation_prompt": add_generation_prompt}
    ours = _our_chat(tok, TOOL_CONVERSATION, **kwargs)
    assert ours == _hf_chat(hf, TOOL_CONVERSATION, **kwargs)
    text = ours[0]
    assert '"description": "Météo d\'une ville — 天气"' in text  # tojson keeps non-ASCII
    assert '{\n  "type": "function",' in text  # tojson(indent=2)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "None" not in text  # content=None is dropped, not rendered


@pytest.mark.parametrize("flavour", ["internlm2", "qwen2"])
def test_raise_exception_raises_in_both(loaded: dict[str, tuple[Tokenizer, Any]], flavour: str) -> None:
    tok, hf = loaded[flavour]
    good = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(good, chat_template=RAISING_TEMPLATE) == hf.apply_chat_template(
        good, chat_template=RAISING_TEMPLATE, tokenize=False
    )
    bad = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        hf.apply_chat_template(bad, chat_template=RAISING_TEMPLATE, tokenize=False)
    with pytest.raises(TokenizerError, match=r"Unknown role: robot\. Only user/assistant/system\."):
        tok.apply_chat_template(bad, chat_template=RAISING_TEMPLATE)  # type: ignore[arg-type]


def test_extra_kwargs_and_special_tokens_reach_the_template(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, hf = loaded["internlm2"]
    template = (
        "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|"
        "{{ tools is none }}|{{ documents is none }}]"
        "{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}"
        "{% for m in messages %}{{ m.content | upper }}{% if m.reasoning_content is defined %}"
        "({{ m.reasoning_content }}){% endif %}{% endfor %}"
        "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{{ {'b': 1, 'a': 'é'} | tojson }}"
    )
    messages = [{"role": "assistant", "content": "ok", "thinking": "hmm"}]
    for kwargs in ({}, {"enable_thinking": True}, {"bos_token": "OVERRIDE"}):
        ours = _our_chat(tok, messages, chat_template=template, **kwargs)
        assert ours == _hf_chat(hf, messages, chat_template=template, **kwargs)
    text = tok.apply_chat_template(messages, chat_template=template, enable_thinking=True)
    assert text == '[<s>|</s>|<pad>|<unk>|True|True]<think>OK(hmm)012{"b": 1, "a": "é"}'


def test_generation_tag_is_accepted(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, hf = loaded["internlm2"]
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    messages = CONVERSATIONS["multi_no_system"]
    assert _our_chat(tok, messages, chat_template=template) == _hf_chat(hf, messages, chat_template=template)


def test_sandbox_blocks_unsafe_templates(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["internlm2"]
    messages = CONVERSATIONS["single"]
    with pytest.raises(TokenizerError, match="unsafe"):
        tok.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="underscore"):
        tok.apply_chat_template(messages, chat_template="{% set ns = namespace(_x=1) %}{{ ns._x }}")


def test_chat_template_jinja_file_takes_precedence(flavours: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "with_file"
    shutil.copytree(flavours["qwen2"], path)
    file_template = (
        "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}"
    )
    (path / "chat_template.jinja").write_text(file_template, encoding="utf-8")
    tok, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == file_template == hf.chat_template
    for gen in (False, True):
        messages = CONVERSATIONS["multi_with_system"]
        ours = _our_chat(tok, messages, add_generation_prompt=gen)
        assert ours == _hf_chat(hf, messages, add_generation_prompt=gen)
    # Saving writes the template into tokenizer_config.json and drops the file that would override it.
    tok.save_pretrained(path)
    assert not (path / "chat_template.jinja").exists()
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == file_template
    assert AutoTokenizer.from_pretrained(path).chat_template == file_template


def test_named_chat_templates_from_config(flavours: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "named"
    shutil.copytree(flavours["qwen2"], path)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    simple = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
    config["chat_template"] = [
        {"name": "default", "template": simple},
        {"name": "tool_use", "template": QWEN2_TEMPLATE},
        {"name": "llama", "template": LLAMA3_TEMPLATE},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == simple
    assert tok.chat_templates == hf.chat_template
    messages = CONVERSATIONS["multi_no_system"]
    assert _our_chat(tok, messages) == _hf_chat(hf, messages)  # "default"
    assert _our_chat(tok, TOOL_CONVERSATION, tools=TOOLS) == _hf_chat(hf, TOOL_CONVERSATION, tools=TOOLS)
    assert "<tools>" in tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)  # type: ignore[operator]
    by_name = {"chat_template": "llama", "date_string": "1 Jan 2025"}
    assert _our_chat(tok, messages, **by_name) == _hf_chat(hf, messages, **by_name)
    # A save keeps the list, and transformers reads it back the same.
    tok.save_pretrained(tmp_path / "resaved")
    again = AutoTokenizer.from_pretrained(tmp_path / "resaved")
    assert again.chat_template == tok.chat_templates
    assert Tokenizer.from_pretrained(tmp_path / "resaved").chat_templates == tok.chat_templates


def test_builtin_template_used_only_without_one(
    flavours: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "no_template"
    shutil.copytree(flavours["internlm2"], path)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template is None
    hf = AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS["multi_with_system"]
    with caplog.at_level(logging.WARNING, logger="lmstack.core.tokenizer"):
        first = _our_chat(tok, messages, add_generation_prompt=True)
        _our_chat(tok, messages)
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1
    assert first == _hf_chat(hf, messages, add_generation_prompt=True, chat_template=INTERNLM2_CHAT_TEMPLATE)
    # A tokenizer with its own template never falls back.
    llama = Tokenizer.from_pretrained(flavours["llama3"])
    assert "<|start_header_id|>" in llama.apply_chat_template(messages, date_string="x")  # type: ignore[operator]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ({"role": "user", "content": "hi"}, "must be a list of dicts"),
        ("hello", "must be a list of dicts"),
        ([], "empty"),
        ([{"role": "user", "content": "hi"}, "oops"], r"messages\[1\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] needs a string 'role'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant"}],
            r"messages\[1\] \(role 'assistant'\) has no 'content'",
        ),
        ([{"role": "user", "content": 42}], r"messages\[0\]\['content'\] must be a string or a list"),
    ],
)
def test_bad_messages_raise(loaded: dict[str, tuple[Tokenizer, Any]], messages: Any, needle: str) -> None:
    tok, _ = loaded["internlm2"]
    with pytest.raises(TokenizerError, match=needle):
        tok.apply_chat_template(messages)
    with pytest.raises(TokenizerError, match=needle):
        tok.apply_chat_template(messages, tokenize=True)


def test_bad_tools_raise(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["qwen2"]
    with pytest.raises(TokenizerError, match=r"tools\[0\] must be a JSON-schema dict"):
        tok.apply_chat_template(CONVERSATIONS["single"], tools=["get_weather"])  # type: ignore[list-item]


def test_template_syntax_error_raises(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["internlm2"]
    broken = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(TokenizerError, match=r"syntax error on line 2") as info:
        tok.apply_chat_template(CONVERSATIONS["single"], chat_template=broken)
    assert "{{ m.content }" in str(info.value)
    with pytest.raises(TokenizerError, match="syntax error"):
        tok.apply_chat_template(CONVERSATIONS["single"], chat_template="{% if x %}never closed")
    with pytest.raises(TokenizerError, match="rendering the chat template failed"):
        tok.apply_chat_template(CONVERSATIONS["single"], chat_template="{{ messages[0].content + 1 }}")


# --------------------------------------------------------------------------------------------
# loading errors
# --------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="does not exist") as info:
        Tokenizer.from_pretrained(missing)
    assert str(missing) in str(info.value) and "tokenizer.json" in str(info.value)


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no tokenizer files") as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "config.json" in message


def test_path_is_a_file(flavours: dict[str, Path]) -> None:
    with pytest.raises(TokenizerError, match="is a file"):
        Tokenizer.from_pretrained(flavours["internlm2"] / "tokenizer.json")


def test_corrupt_tokenizer_json(flavours: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "corrupt"
    shutil.copytree(flavours["internlm2"], path)
    data = (path / "tokenizer.json").read_bytes()
    (path / "tokenizer.json").write_bytes(data[: len(data) // 2])  # truncated mid-write
    with pytest.raises(TokenizerError, match="corrupt") as info:
        Tokenizer.from_pretrained(path)
    assert str(path / "tokenizer.json") in str(info.value)


def test_corrupt_tokenizer_config(flavours: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "corrupt_config"
    shutil.copytree(flavours["internlm2"], path)
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>",', encoding="utf-8")
    with pytest.raises(TokenizerError, match="could not read") as info:
        Tokenizer.from_pretrained(path)
    assert "tokenizer_config.json" in str(info.value)


def test_bad_encode_decode_inputs(loaded: dict[str, tuple[Tokenizer, Any]]) -> None:
    tok, _ = loaded["internlm2"]
    with pytest.raises(TokenizerError, match="takes a str"):
        tok.encode(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="single str"):
        tok.encode_batch("abc")
    with pytest.raises(TokenizerError, match=r"texts\[1\]"):
        tok.encode_batch(["a", None])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="non-negative"):
        tok.decode([1, -5])
    with pytest.raises(TokenizerError, match="integers"):
        tok.decode(["a"])  # type: ignore[list-item]
    assert tok.encode_batch([]) == [] and tok.decode_batch([]) == []
    torch = pytest.importorskip("torch")
    ids = tok.encode(TEXTS[5])
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode_batch(torch.tensor([ids, ids])) == [tok.decode(ids)] * 2


# --------------------------------------------------------------------------------------------
# training errors
# --------------------------------------------------------------------------------------------


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"too small.*at least 262"):
        train_bpe_tokenizer(iter(_corpus()), 100)
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe_tokenizer(iter([]), 400)
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe_tokenizer(iter(["", ""]), 400)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe_tokenizer([empty], 400)
    with pytest.raises(TokenizerError, match="does not exist") as info:
        train_bpe_tokenizer([tmp_path / "missing.txt"], 400)
    assert "missing.txt" in str(info.value)
    with pytest.raises(TokenizerError, match="iterator"):
        train_bpe_tokenizer(["a list of texts is read as paths"], 400)
    with pytest.raises(TokenizerError, match="not a str"):
        train_bpe_tokenizer(iter(["ok", 3]), 400)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# save_pretrained: into existing directories, and atomically
# --------------------------------------------------------------------------------------------


def _model_dir(flavours: dict[str, Path], tmp_path: Path) -> Path:
    """A checkpoint directory: another tokenizer, weights, and a stale chat_template.jinja."""
    path = tmp_path / "model"
    shutil.copytree(flavours["qwen2"], path)
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (path / "chat_template.jinja").write_text("stale {{ messages }}", encoding="utf-8")
    return path


def test_save_into_existing_directory_keeps_other_files(
    loaded: dict[str, tuple[Tokenizer, Any]], flavours: dict[str, Path], tmp_path: Path
) -> None:
    path = _model_dir(flavours, tmp_path)
    weights = (path / "model.safetensors").read_bytes()
    tok, _ = loaded["llama3"]
    tok.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == weights
    assert (path / "config.json").exists() and not (path / "chat_template.jinja").exists()
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.chat_template == LLAMA3_TEMPLATE
    assert [hf.encode(t) for t in TEXTS] == tok.encode_batch(TEXTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left behind


def test_save_is_atomic_when_writing_fails(
    loaded: dict[str, tuple[Tokenizer, Any]],
    flavours: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _model_dir(flavours, tmp_path)
    before = _snapshot(path)
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second staged file: disk full
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    tok, _ = loaded["internlm2"]
    with pytest.raises(TokenizerError, match="No space left on device") as info:
        tok.save_pretrained(path)
    assert "Nothing there was changed" in str(info.value)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # A directory that did not exist is not created half-way either.
    calls["n"] = 0
    with pytest.raises(TokenizerError):
        tok.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_save_is_atomic_when_moving_into_place_fails(
    loaded: dict[str, tuple[Tokenizer, Any]],
    flavours: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    swap: str,
) -> None:
    from lmstack.core import _atomic

    path = _model_dir(flavours, tmp_path)
    before = _snapshot(path)
    assert Tokenizer.from_pretrained(path).chat_template == "stale {{ messages }}"
    calls = {"n": 0}

    def failing_exchange(a: Path, b: Path) -> bool:
        calls["n"] += 1
        raise OSError(5, "Input/output error")

    real_rename = os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(dst) == path:  # the new directory moving into place, after the old one moved aside
            calls["n"] += 1
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    if swap == "exchange":
        monkeypatch.setattr(_atomic, "_exchange", failing_exchange)
    else:  # a filesystem without RENAME_EXCHANGE: two renames
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "rename", failing_rename)
    tok, _ = loaded["internlm2"]
    with pytest.raises(TokenizerError, match="Input/output error"):
        tok.save_pretrained(path)
    assert calls["n"] == 1
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.undo()
    # The old tokenizer still loads as before, in both libraries.
    assert Tokenizer.from_pretrained(path).encode(TEXTS[1]) == AutoTokenizer.from_pretrained(path).encode(
        TEXTS[1]
    )


def test_save_swaps_whole_directories(
    loaded: dict[str, tuple[Tokenizer, Any]],
    flavours: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Replacing files one by one left a moment where the directory mixed old and new files; now the
    # old directory stays whole until the complete new one takes its place.
    from lmstack.core import _atomic

    path = _model_dir(flavours, tmp_path)
    before = _snapshot(path)
    old = Tokenizer.from_pretrained(path)
    new, _ = loaded["internlm2"]
    real_exchange = _atomic._exchange
    seen: list[Path] = []

    def checking_exchange(staging: Path, target: Path) -> bool:
        seen.append(target)
        assert _snapshot(target) == before  # still exactly the old directory
        staged = Tokenizer.from_pretrained(staging)
        assert staged.encode_batch(TEXTS) == new.encode_batch(TEXTS)
        assert (staging / "model.safetensors").read_bytes() == before["model.safetensors"]
        assert not (staging / "chat_template.jinja").exists()
        return real_exchange(staging, target)

    monkeypatch.setattr(_atomic, "_exchange", checking_exchange)
    new.save_pretrained(path)
    assert seen == [path]
    assert Tokenizer.from_pretrained(path).encode_batch(TEXTS) == new.encode_batch(TEXTS)
    assert old.encode_batch(TEXTS) != new.encode_batch(TEXTS)  # the check above could tell them apart


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------

SPM_TEXTS = [
    *TEXTS,
    "  many    spaces   ",
    "▁already▁escaped",
    "x<s>y</s>z <unk> <s> ",
    "user-defined <tool> piece<tool>x",
]
SPM_SPECIALS = ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp(f"spm_{request.param}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(5, lines=300)),
        model_prefix=str(path / "tokenizer"),
        model_type=request.param,
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=["<tool>"],
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "chat_template": INTERNLM2_CHAT_TEMPLATE}),
        encoding="utf-8",
    )
    return path


def test_sentencepiece_matches_sentencepiece(spm_dir: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    processor = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(spm_dir)
    assert tok.vocab_size == processor.get_piece_size()
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert tok.bos_token_id == processor.bos_id() and tok.eos_token_id == processor.eos_id()
    for text in SPM_TEXTS:
        if any(special in text for special in SPM_SPECIALS):
            continue  # special tokens are matched by us (and transformers), never by sentencepiece
        expected = processor.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [processor.bos_id(), *expected], text
        assert tok.decode(expected) == processor.decode(expected) or text.startswith("▁"), text
    # Special tokens split the text; each chunk is encoded as sentencepiece encodes it alone.
    im_start = processor.piece_to_id("<|im_start|>")
    assert tok.encode("x<s>y <|im_start|>z", add_special_tokens=False) == [
        *processor.encode("x"),
        processor.bos_id(),
        *processor.encode("y "),
        im_start,
        *processor.encode("z"),
    ]
    assert im_start in tok.all_special_ids
    assert processor.piece_to_id("<tool>") in tok.encode("a<tool>b")
    assert processor.piece_to_id("<tool>") not in tok.all_special_ids  # user-defined pieces are plain text


def test_sentencepiece_save_loads_in_transformers(spm_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(spm_dir)
    tok.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "tokenizer.model").read_bytes() == (
        spm_dir / "tokenizer.model"
    ).read_bytes()
    hf = AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert len(hf) == tok.vocab_size
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    messages = CONVERSATIONS["multi_with_system"]
    ours = _our_chat(tok, messages, add_generation_prompt=True)
    assert ours == _hf_chat(hf, messages, add_generation_prompt=True)
    assert ours[1][0] == tok.bos_token_id and ours[1][1] == tok.token_to_id("<|im_start|>")


def test_sentencepiece_raw_model_matches_transformers(spm_dir: Path) -> None:
    # transformers needs protobuf to convert a bare tokenizer.model; compare where it can.
    pytest.importorskip("google.protobuf")
    tok, hf = Tokenizer.from_pretrained(spm_dir), AutoTokenizer.from_pretrained(spm_dir)
    assert len(hf) == tok.vocab_size
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids), text


def test_sentencepiece_missing_gives_install_hint(spm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(TokenizerError, match=r"pip install lmstack-core\[sentencepiece\]"):
        Tokenizer.from_pretrained(spm_dir)


def test_corrupt_sentencepiece_model(tmp_path: Path) -> None:
    pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05not a model at all")
    with pytest.raises(TokenizerError, match="could not read the SentencePiece model") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert "tokenizer.model" in str(info.value)
