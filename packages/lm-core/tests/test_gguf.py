"""GGUF export against two independent readers: transformers' GGUF loader and llama.cpp.

Every model is a tiny random-init one built here (odd-ish sizes, random norms and biases so a misplaced
norm or bias cannot hide behind ones and zeros), saved with lmstack's ``save_pretrained`` together with
a tokenizer trained here: byte-level BPE (lmstack's trainer) or a SentencePiece BPE model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmstack.core import (
    CausalLM,
    ConfigError,
    ModelConfig,
    RopeScaling,
    Tokenizer,
    export_gguf,
    save_pretrained,
    train_bpe_tokenizer,
)
from lmstack.core._cli import main
from lmstack.core.tokenizer import INTERNLM2_CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Unicode too: café, naïve, Ärger, 東京, emoji 🙂 and ∑ math.",
    "numbers 12345 678 and    runs of spaces\n\nand new lines\ttabs.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
]
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " café  東京\n\n x",
    "   leading spaces and trailing   ",
    "numbers 12345 6",
    "tabs\tand\nnew lines\n",
    "emoji 🙂 ∑",
    "<|im_start|>user\nhi<|im_end|>",
]
PROMPT_LEN = 21


# ------------------------------------------------------------------------------------------------
# fixtures: tokenizers and tiny checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe_tokenizer(iter(CORPUS * 20), vocab_size=420, min_frequency=2)
    path = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("sp")
    # Llama-style SentencePiece: BPE, byte fallback, no normalization or whitespace collapsing.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30),
        model_prefix=str(path / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "chat_template": INTERNLM2_CHAT_TEMPLATE}),
        encoding="utf-8",
    )
    return path


def _tokenizer(kind: str, bpe_dir: Path, sp_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(bpe_dir if kind == "bpe" else sp_dir)


def build_checkpoint(
    path: Path, tokenizer: Tokenizer, model_type: str = "llama", seed: int = 0, **overrides: Any
) -> CausalLM:
    """A tiny random model (GQA: 4 query heads, 2 KV heads) saved with ``tokenizer`` to ``path``."""
    fields: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": tokenizer.vocab_size + 5,  # spare embedding rows, as real checkpoints pad
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    save_pretrained(model, path, tokenizer=tokenizer)
    return model.eval()


def prompt_ids(model: CausalLM, seed: int = 1, length: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size - 5, (length,), generator=g).tolist()


def our_logits(model: CausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def rounded_model(model: CausalLM, gguf_type: str) -> CausalLM:
    """A copy of ``model`` whose 2-D weights are rounded as ``gguf_type`` stores them (1-D stay f32)."""
    copy = CausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    qt = gguf.GGMLQuantizationType
    with torch.no_grad():
        for p in copy.parameters():
            if p.dim() != 2:
                continue
            if gguf_type == "f16":
                p.copy_(p.to(torch.float16).to(torch.float32))
            elif gguf_type in ("q8_0", "q4_0"):
                kind = qt.Q8_0 if gguf_type == "q8_0" else qt.Q4_0
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind).reshape(p.shape)))
    return copy.eval()


# (model type, tokenizer, tied embeddings, extra config) for the transformers comparison.
CASES = {
    "llama-bpe-untied": ("llama", "bpe", False, {}),
    "llama-bpe-tied": ("llama", "bpe", True, {}),
    "qwen2-bpe-tied-bias": ("qwen2", "bpe", True, {}),
    "qwen2-bpe-untied-bias": ("qwen2", "bpe", False, {}),
    "llama-sp-untied": ("llama", "sp", False, {}),
    "llama-head-dim-24": ("llama", "bpe", False, {"head_dim": 24}),
}


@pytest.fixture
def case(
    request: pytest.FixtureRequest, tmp_path: Path, bpe_dir: Path, sp_dir: Path
) -> Iterator[tuple[CausalLM, Tokenizer, Path]]:
    model_type, tok_kind, tied, extra = CASES[request.param]
    tok = _tokenizer(tok_kind, bpe_dir, sp_dir)
    model = build_checkpoint(tmp_path / "ckpt", tok, model_type, tie_word_embeddings=tied, **extra)
    yield model, tok, tmp_path / "ckpt"


# ------------------------------------------------------------------------------------------------
# reference 1: transformers' GGUF loader (dequantizes, undoes llama.cpp's q/k permutation)
# ------------------------------------------------------------------------------------------------


def _hf_from_gguf(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_transformers_loads_f32_with_same_logits(
    case: tuple[CausalLM, Tokenizer, Path], tmp_path: Path
) -> None:
    model, _, src = case
    out = export_gguf(src, tmp_path / "model.gguf")
    hf = _hf_from_gguf(out)
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert hf.config.num_key_value_heads == model.config.num_key_value_heads
    ids = prompt_ids(model)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    # f32 stores our weights bit for bit and transformers undoes the q/k row permutation exactly, so
    # both run the same fp32 math; only kernel summation order differs (observed: 0.0).
    np.testing.assert_allclose(theirs, our_logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("case", ["llama-bpe-untied", "qwen2-bpe-untied-bias"], indirect=True)
def test_transformers_loads_f16_q8_0_and_q4_0(
    case: tuple[CausalLM, Tokenizer, Path], gguf_type: str, tmp_path: Path
) -> None:
    model, _, src = case
    out = export_gguf(src, tmp_path / "model.gguf", type=gguf_type)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t.tensor_type for t in reader.tensors}
    want = gguf.GGMLQuantizationType[gguf_type.upper()]
    assert stored["blk.0.attn_q.weight"] == want and stored["token_embd.weight"] == want
    assert stored["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32
    hf = _hf_from_gguf(out)
    ids = prompt_ids(model)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    # Exact placement: the same logits as our model with its 2-D weights rounded the same way.
    np.testing.assert_allclose(theirs, our_logits(rounded_model(model, gguf_type), ids), rtol=0, atol=1e-5)
    # Against the unrounded model: f16 keeps 11 significant bits (relative error <= 2^-11 per weight),
    # q8_0 8 bits with one scale per 32 values (<= 1/254 of the block's largest weight); summed over
    # 64-96-wide dot products and two layers that stays well under 1% / 5% of the logit scale. q4_0
    # keeps 4 bits (<= 1/16 of the block's largest weight): a looser 30%.
    ours = our_logits(model, ids)
    bound = {"f16": 1e-2, "q8_0": 5e-2, "q4_0": 0.3}[gguf_type] * float(np.abs(ours).max())
    assert float(np.abs(theirs - ours).max()) < bound


@pytest.mark.parametrize(
    "case", ["llama-bpe-untied", "qwen2-bpe-tied-bias", "llama-sp-untied"], indirect=True
)
def test_transformers_tokenizer_from_gguf_matches(
    case: tuple[CausalLM, Tokenizer, Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    _, tok, src = case
    out = export_gguf(src, tmp_path / "model.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        if tok.token_to_id("<0x41>") is not None and (text[:1].isspace() or "<|" in text):
            # transformers rebuilds a GGUF's SentencePiece tokenizer non-legacy: one dummy-prefix
            # space fewer for text that starts with whitespace, and none after a special token.
            # sentencepiece, lmstack (legacy, as the checkpoint's own tokenizer) and llama.cpp agree
            # there; test_llamacpp_f32_logits_and_tokenizer checks these texts against llama.cpp.
            continue
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text
        assert hf.encode(text) == tok.encode(text), text  # the same bos/eos added
    assert hf.bos_token_id == tok.bos_token_id and hf.eos_token_id == tok.eos_token_id
    assert hf.chat_template == tok.chat_template


# ------------------------------------------------------------------------------------------------
# reference 2: llama.cpp (llama-cpp-python)
# ------------------------------------------------------------------------------------------------


class _LlamaCpp:
    """llama.cpp on a GGUF, with an f32 KV cache so that only the weights and the math are compared."""

    def __init__(self, path: Path, n_ctx: int = 64) -> None:
        llama_cpp = pytest.importorskip("llama_cpp")
        f32 = 0  # GGML_TYPE_F32; the default f16 cache alone adds ~1e-4 to the logits
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=64, n_threads=1, logits_all=True, verbose=False,
            type_k=f32, type_v=f32, seed=0,
        )  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == n:
                return out
        return out

    def close(self) -> None:
        self.llm.close()


@pytest.fixture
def llamacpp() -> Iterator[list[_LlamaCpp]]:
    opened: list[_LlamaCpp] = []
    yield opened
    for runner in opened:
        runner.close()


def _open(opened: list[_LlamaCpp], path: Path) -> _LlamaCpp:
    runner = _LlamaCpp(path)
    opened.append(runner)
    return runner


def _greedy(model: CausalLM, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


# f32 tolerance against llama.cpp: the same weights, but llama.cpp's own fp32 kernels (other summation
# order, its RoPE tables and softmax) on logits of magnitude ~1: observed <= 2.4e-7.
F32_ATOL = 1e-5


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_llamacpp_f32_logits_and_tokenizer(
    case: tuple[CausalLM, Tokenizer, Path], tmp_path: Path, llamacpp: list[_LlamaCpp]
) -> None:
    model, tok, src = case
    out = export_gguf(src, tmp_path / "model.gguf")
    cpp = _open(llamacpp, out)
    ids = prompt_ids(model)
    np.testing.assert_allclose(cpp.logits(ids), our_logits(model, ids), rtol=0, atol=F32_ATOL)
    for text in TEXTS:
        theirs = cpp.llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == tok.encode(text, add_special_tokens=False), text
    # llama.cpp adds bos when the metadata says encoding does.
    assert cpp.llm.tokenize(b"Hello", add_bos=True, special=True) == tok.encode("Hello")
    assert cpp.llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert cpp.llm.token_bos() == tok.bos_token_id and cpp.llm.token_eos() == tok.eos_token_id


ROPE_SCALINGS = {
    "linear": RopeScaling("linear", factor=2.0),
    "yarn": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=16),
    "llama3": RopeScaling(
        "llama3", factor=8.0, original_max_position_embeddings=16, low_freq_factor=1.0, high_freq_factor=4.0
    ),
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_llamacpp_rope_scaling(
    scaling: str, tmp_path: Path, bpe_dir: Path, llamacpp: list[_LlamaCpp]
) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    # rope_theta 500 makes every frequency band (kept, blended, interpolated) turn within 40 tokens.
    model = build_checkpoint(tmp_path / "ckpt", tok, rope_theta=500.0, rope_scaling=ROPE_SCALINGS[scaling])
    plain = build_checkpoint(tmp_path / "plain", tok, rope_theta=500.0)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf")
    if scaling == "llama3":
        assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(out)).tensors}
    ids = prompt_ids(model, length=40)
    ours = our_logits(model, ids)
    assert np.abs(ours - our_logits(plain, ids)).max() > 100 * F32_ATOL  # the scaling matters here
    np.testing.assert_allclose(_open(llamacpp, out).logits(ids), ours, rtol=0, atol=F32_ATOL)


@pytest.mark.llamacpp
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_llamacpp_greedy_decode_matches(
    gguf_type: str, tmp_path: Path, bpe_dir: Path, llamacpp: list[_LlamaCpp]
) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    model = build_checkpoint(tmp_path / "ckpt", tok, seed=3)
    with torch.no_grad():  # a larger output scale: fewer near-ties between the top two tokens
        model.lm_head.weight.mul_(8.0)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    cpp = _open(llamacpp, export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", type=gguf_type))
    prompts = [prompt_ids(model, seed=s, length=5 + s % 7) for s in range(20)]
    same = sum(cpp.greedy(p, 8) == _greedy(model, p, 8) for p in prompts)
    # f32: the same weights and fp32 math, so every prompt's 8 greedy tokens agree. f16 and q8_0 are
    # lossy twice over: the stored weights, and llama.cpp's matmuls for those types round the
    # activations too (to f16, or to 8 bits per block of 32); a top-2 near-tie may then flip. Observed
    # with these seeds: 20/20 for all three types.
    assert same >= {"f32": 20, "f16": 19, "q8_0": 16}[gguf_type], same


# ------------------------------------------------------------------------------------------------
# refusals, atomicity, the command line
# ------------------------------------------------------------------------------------------------


def test_dynamic_rope_refused_unless_asked(tmp_path: Path, bpe_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    build_checkpoint(tmp_path / "ckpt", tok, rope_scaling=RopeScaling("dynamic", factor=2.0))
    with pytest.raises(ConfigError, match="dynamic NTK"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*m.gguf*"))
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", dynamic_rope_as_plain=True)
    assert "llama.rope.scaling.type" not in gguf.GGUFReader(str(out)).fields


def test_failed_write_leaves_old_file(tmp_path: Path, bpe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmstack.core.checkpoint import _gguf

    tok = Tokenizer.from_pretrained(bpe_dir)
    build_checkpoint(tmp_path / "ckpt", tok)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    calls = {"n": 0}
    real = _gguf._encode

    def failing(*args: Any) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(_gguf, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tmp_path / "ckpt", target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]  # no temporary left


def test_placeholder_vocab(tmp_path: Path, bpe_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    model = build_checkpoint(tmp_path / "ckpt", tok)
    out = export_gguf(model, tmp_path / "m.gguf", placeholder_vocab=True)
    fields = gguf.GGUFReader(str(out)).fields
    assert len(fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size


def test_cli_convert_to_gguf_q8_0(tmp_path: Path, bpe_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    build_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "out.gguf"
    assert main(["convert", str(tmp_path / "ckpt"), str(out), "--to", "gguf", "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert {t.name: t.tensor_type for t in reader.tensors}["output.weight"] == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize(
    ("extra", "dst", "message"),
    [
        (["--type", "f16"], "out", "--type applies to GGUF output only"),
        (["--to", "gguf"], "out.bin", "must end in .gguf"),
        (["--to", "gguf", "--dtype", "float16"], "out.gguf", "--dtype applies to --to hf only"),
        (["--to", "gguf"], "dynamic.gguf", "dynamic NTK"),
        (["--to", "gguf"], "mlp.gguf", "feed-forward biases"),
    ],
)
def test_cli_convert_gguf_errors(
    extra: list[str],
    dst: str,
    message: str,
    tmp_path: Path,
    bpe_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tok = Tokenizer.from_pretrained(bpe_dir)
    overrides: dict[str, Any] = {}
    if dst.startswith("dynamic"):
        overrides["rope_scaling"] = RopeScaling("dynamic", factor=2.0)
    if dst.startswith("mlp"):
        overrides["mlp_bias"] = True
    build_checkpoint(tmp_path / "ckpt", tok, **overrides)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / dst), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / dst).exists()
