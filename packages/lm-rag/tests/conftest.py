"""Fixtures for lmstack-rag's index and assistant tests: the default embedder (loaded once), small corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Invented topics: a file each, with a distinctive name and a few facts, so a question has one answer.
_SYLLABLES = (
    "ka",
    "lo",
    "mer",
    "ti",
    "vos",
    "dun",
    "pra",
    "zel",
    "qui",
    "bra",
    "nor",
    "sil",
    "tam",
    "ve",
    "gor",
)
_THINGS = (
    "river",
    "mountain",
    "festival",
    "machine",
    "library",
    "bridge",
    "garden",
    "ship",
    "tower",
    "market",
)
_COLOURS = ("red", "green", "blue", "amber", "violet", "silver", "white", "black", "golden", "grey")


def topic_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


@pytest.fixture(scope="session")
def embedder():
    from lmstack.rag.embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(folder, n, seed)``: n Markdown files on invented topics -> {stem: (name, facts)}."""

    def make(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[str, dict[str, str]]]:
        rng = random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        topics: dict[str, tuple[str, dict[str, str]]] = {}
        names: set[str] = set()
        while len(topics) < n:
            name = topic_name(rng)
            if name in names:
                continue
            names.add(name)
            facts = {
                "thing": rng.choice(_THINGS),
                "colour": rng.choice(_COLOURS),
                "year": str(rng.randint(1200, 1990)),
            }
            stem = f"doc{len(topics):03d}"
            text = (
                f"# {name}\n\n{name} is a {facts['thing']} that was first recorded in {facts['year']}. "
                f"Visitors remember {name} for its {facts['colour']} colour.\n\n## History\n\n"
                f"The story of {name} began in {facts['year']}, when travellers described the "
                f"{facts['thing']} "
                f"in their letters. Today {name} is painted {facts['colour']} every spring.\n"
            )
            (folder / f"{stem}.md").write_text(text, encoding="utf-8")
            topics[stem] = (name, facts)
        return topics

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama-type model with a BPE tokenizer trained on English words, built by lmstack.core."""
    import torch

    from lmstack.core import CausalLM, ModelConfig, save_pretrained, train_bpe_tokenizer

    rng = random.Random(0)
    words = [
        "the",
        "a",
        "of",
        "is",
        "was",
        "in",
        "river",
        "mountain",
        "colour",
        "year",
        "first",
        "recorded",
        "painted",
        "history",
        "visitors",
    ]
    corpus = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(300)]
    tokenizer = train_bpe_tokenizer(iter(corpus), vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(CausalLM(config), out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def calibrated_index(tmp_path_factory: pytest.TempPathFactory, embedder):
    """``calibrated_index(folder, docs, related, unrelated)``: an index over ``{file name: text}`` written to
    ``folder``, its gate calibrated on the two question lists; closed at the end of the session."""
    from lmstack.rag import Index

    made = []

    def make(folder: str, docs: dict[str, str], related: list[str], unrelated: list[str]):
        root = tmp_path_factory.mktemp(f"rag-{folder}")
        (root / folder).mkdir()
        for name, text in docs.items():
            (root / folder / name).write_text(text)
        index = Index.create(root / "index", embedder=embedder)
        index.ingest([root / folder], use_tqdm=False)
        index.calibrate(related, unrelated, use_tqdm=False)
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()
